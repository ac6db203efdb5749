//! Pairing codes such as `7-amber-lantern-zebra`: a number that names a
//! rendezvous room and words that are the password of the key exchange.

use std::fmt;
use std::sync::OnceLock;

use rand::Rng;
use rand::seq::IndexedRandom;

/// The EFF short word list 2.0 (1,296 words, each with a unique three-letter
/// prefix), CC BY 3.0 US, Electronic Frontier Foundation. Its one hyphenated
/// word, `yo-yo`, is spelled `yoyo` here because `-` separates words.
const WORDS: &str = include_str!("words.txt");

/// The word list codes are made from.
pub fn wordlist() -> &'static [&'static str] {
    static LIST: OnceLock<Vec<&'static str>> = OnceLock::new();
    LIST.get_or_init(|| WORDS.lines().map(str::trim).filter(|w| !w.is_empty()).collect())
}

/// A code is refused when it is malformed; a well-formed code with the wrong
/// words is only found out by the key exchange.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodeError {
    /// Nothing was typed.
    #[error("empty code")]
    Empty,
    /// The code does not start with a number.
    #[error("a code starts with a number, like 7-{example}; got {0:?}", example = "lantern-zebra")]
    BadNumber(String),
    /// Fewer words than a code has.
    #[error("a code has at least {min} words after the number; got {got}")]
    TooFewWords {
        /// The fewest a code has.
        min: usize,
        /// How many were typed.
        got: usize,
    },
    /// A word that is not on the list.
    #[error("{word:?} is not a code word{}", suggestion.as_ref().map(|s| format!(" (did you mean {s:?}?)")).unwrap_or_default())]
    UnknownWord {
        /// The word as typed.
        word: String,
        /// The list's word with the same three-letter prefix, if any.
        suggestion: Option<String>,
    },
}

/// A pairing code: `<nameplate>-<word>-<word>-...`.
#[derive(Clone, PartialEq, Eq)]
pub struct Code {
    nameplate: u32,
    words: Vec<String>,
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The words are a password: keep them out of logs.
        f.debug_struct("Code").field("nameplate", &self.nameplate).finish_non_exhaustive()
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.nameplate)?;
        for w in &self.words {
            write!(f, "-{w}")?;
        }
        Ok(())
    }
}

impl Code {
    /// Words in a generated code: 31 bits, and an attacker gets one guess.
    pub const DEFAULT_WORDS: usize = 3;
    /// Fewest words a typed code may have.
    pub const MIN_WORDS: usize = 2;
    /// Generated nameplates are drawn from `1..=MAX_NAMEPLATE`.
    pub const MAX_NAMEPLATE: u32 = 999;

    /// A fresh code with a random nameplate and `words` random words.
    pub fn generate(words: usize) -> Code {
        let nameplate = rand::rng().random_range(1..=Self::MAX_NAMEPLATE);
        Self::with_nameplate(nameplate, words)
    }

    /// A fresh code on a given nameplate (when the first one was taken).
    pub fn with_nameplate(nameplate: u32, words: usize) -> Code {
        let list = wordlist();
        let mut rng = rand::rng();
        let words = (0..words.max(Self::MIN_WORDS))
            .map(|_| list.choose(&mut rng).expect("the list is not empty").to_string())
            .collect();
        Code { nameplate, words }
    }

    /// Reads a typed code: case and extra spaces do not matter, and words may
    /// be separated by `-` or spaces.
    pub fn parse(input: &str) -> Result<Code, CodeError> {
        let lower = input.trim().to_lowercase();
        let mut parts = lower.split(|c: char| c == '-' || c.is_whitespace()).filter(|p| !p.is_empty());
        let first = parts.next().ok_or(CodeError::Empty)?;
        let nameplate = match first.parse::<u32>() {
            Ok(n) if n > 0 && first.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Err(CodeError::BadNumber(first.to_string())),
        };
        let list = wordlist();
        let mut words = Vec::new();
        for w in parts {
            if list.binary_search(&w).is_err() {
                let suggestion = w
                    .get(..3)
                    .and_then(|prefix| list.iter().find(|c| c.starts_with(prefix)))
                    .map(|s| s.to_string());
                return Err(CodeError::UnknownWord { word: w.to_string(), suggestion });
            }
            words.push(w.to_string());
        }
        if words.len() < Self::MIN_WORDS {
            return Err(CodeError::TooFewWords { min: Self::MIN_WORDS, got: words.len() });
        }
        Ok(Code { nameplate, words })
    }

    /// The number in front: it names the room.
    pub fn nameplate(&self) -> u32 {
        self.nameplate
    }

    /// The signaling room both sides meet in. The server learns the
    /// nameplate, never the words.
    pub fn room(&self) -> String {
        format!("pair-{}", self.nameplate)
    }

    /// The key-exchange password: the whole code in its canonical form.
    pub fn password(&self) -> String {
        self.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_word_list_is_the_eff_short_list() {
        let list = wordlist();
        assert_eq!(list.len(), 1296);
        assert!(list.windows(2).all(|w| w[0] < w[1]), "sorted and unique, for binary search");
        assert!(list.iter().all(|w| w.bytes().all(|b| b.is_ascii_lowercase())));
        // Every word has its own three-letter prefix, which is what makes
        // suggestions for typos unambiguous.
        let mut prefixes: Vec<&str> = list.iter().map(|w| &w[..3]).collect();
        prefixes.dedup();
        assert_eq!(prefixes.len(), 1296);
    }

    #[test]
    fn generated_codes_parse_back() {
        for _ in 0..100 {
            let code = Code::generate(Code::DEFAULT_WORDS);
            assert!((1..=Code::MAX_NAMEPLATE).contains(&code.nameplate()));
            assert_eq!(Code::parse(&code.to_string()).unwrap(), code);
        }
    }

    #[test]
    fn parsing_is_forgiving_about_case_and_spacing() {
        let code = Code::parse("  7 Lantern-ZEBRA   acid ").unwrap();
        assert_eq!(code.to_string(), "7-lantern-zebra-acid");
        assert_eq!(code.room(), "pair-7");
        assert_eq!(code.password(), "7-lantern-zebra-acid");
    }

    #[test]
    fn malformed_codes_are_refused_with_a_reason() {
        assert_eq!(Code::parse("  "), Err(CodeError::Empty));
        assert!(matches!(Code::parse("lantern-zebra"), Err(CodeError::BadNumber(_))));
        assert!(matches!(Code::parse("0-lantern-zebra"), Err(CodeError::BadNumber(_))));
        assert!(matches!(Code::parse("+7-lantern-zebra"), Err(CodeError::BadNumber(_))));
        assert_eq!(Code::parse("7-lantern"), Err(CodeError::TooFewWords { min: 2, got: 1 }));
        assert_eq!(
            Code::parse("7-lantren-zebra"),
            Err(CodeError::UnknownWord { word: "lantren".into(), suggestion: Some("lantern".into()) })
        );
        let e = Code::parse("7-lantren-zebra").unwrap_err().to_string();
        assert!(e.contains("did you mean \"lantern\""), "{e}");
    }

    #[test]
    fn debug_output_hides_the_words() {
        let code = Code::parse("7-lantern-zebra").unwrap();
        let dbg = format!("{code:?}");
        assert!(!dbg.contains("lantern"), "{dbg}");
    }
}
