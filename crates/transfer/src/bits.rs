//! A fixed-size bit set: one bit per chunk.

#[derive(Debug, Clone, Default)]
pub(crate) struct Bits {
    words: Vec<u64>,
}

impl Bits {
    /// `len` bits, all clear. Callers size it from a validated manifest.
    pub(crate) fn new(len: u32) -> Bits {
        Bits { words: vec![0; (len as usize).div_ceil(64)] }
    }

    pub(crate) fn get(&self, at: u32) -> bool {
        self.words.get(at as usize / 64).is_some_and(|w| w & (1 << (at % 64)) != 0)
    }

    /// Sets bit `at`; returns whether it was clear. Out of range is a no-op.
    pub(crate) fn set(&mut self, at: u32) -> bool {
        match self.words.get_mut(at as usize / 64) {
            Some(w) => {
                let was_clear = *w & (1 << (at % 64)) == 0;
                *w |= 1 << (at % 64);
                was_clear
            }
            None => false,
        }
    }

    /// Clears every bit.
    pub(crate) fn clear_all(&mut self) {
        self.words.fill(0);
    }

    /// Clears bit `at`; returns whether it was set.
    pub(crate) fn clear(&mut self, at: u32) -> bool {
        match self.words.get_mut(at as usize / 64) {
            Some(w) => {
                let was_set = *w & (1 << (at % 64)) != 0;
                *w &= !(1 << (at % 64));
                was_set
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Bits;

    #[test]
    fn set_get_clear() {
        let mut b = Bits::new(130);
        assert!(!b.get(129));
        assert!(b.set(129));
        assert!(!b.set(129));
        assert!(b.get(129));
        assert!(b.clear(129));
        assert!(!b.clear(129));
        assert!(!b.set(130 + 64), "out of range is ignored");
        assert!(!b.get(1 << 30));
        b.set(3);
        b.clear_all();
        assert!(!b.get(3));
    }
}
