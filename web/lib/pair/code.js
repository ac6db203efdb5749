// Pairing codes such as `7-amber-lantern-zebra`: a number that names the
// rendezvous room and words that are the password of the key exchange
// (docs/PAIRING.md; Rust: crates/pair/src/code.rs).

import { WORDS } from './words.js';

/** Words in a generated code: 31 bits, and an attacker gets one guess. */
export const DEFAULT_WORDS = 3;
/** Fewest words a typed code may have. */
export const MIN_WORDS = 2;
/** Generated nameplates are drawn from 1..=MAX_NAMEPLATE. */
export const MAX_NAMEPLATE = 999;

/** Why a typed code is refused (`CodeError` in Rust). */
export class CodeError extends Error {
  /**
   * @param {'empty' | 'bad_number' | 'too_few_words' | 'unknown_word'} code
   * @param {string} message
   * @param {{ word?: string, suggestion?: string | null }} [detail]
   */
  constructor(code, message, detail = {}) {
    super(message);
    this.name = 'CodeError';
    this.code = code;
    this.word = detail.word;
    this.suggestion = detail.suggestion ?? null;
  }
}

/** @param {number} n a uniform integer in [0, n) */
function randomBelow(n) {
  const limit = Math.floor(0x1_0000_0000 / n) * n;
  const buf = new Uint32Array(1);
  for (;;) {
    globalThis.crypto.getRandomValues(buf);
    if (buf[0] < limit) return buf[0] % n;
  }
}

export class Code {
  /**
   * @param {number} nameplate
   * @param {string[]} words
   */
  constructor(nameplate, words) {
    this.nameplate = nameplate;
    this.words = words;
  }

  /** A fresh code: a random nameplate and `words` random words. */
  static generate(words = DEFAULT_WORDS) {
    return Code.withNameplate(1 + randomBelow(MAX_NAMEPLATE), words);
  }

  /** @param {number} nameplate @param {number} [words] */
  static withNameplate(nameplate, words = DEFAULT_WORDS) {
    const n = Math.max(words, MIN_WORDS);
    return new Code(nameplate, Array.from({ length: n }, () => WORDS[randomBelow(WORDS.length)]));
  }

  /**
   * Reads a typed code: case and extra spaces do not matter, and words may
   * be separated by `-` or spaces. Throws {@link CodeError}.
   * @param {string} input
   */
  static parse(input) {
    const parts = input.trim().toLowerCase().split(/[-\s]+/).filter(Boolean);
    const first = parts.shift();
    if (first === undefined) throw new CodeError('empty', 'empty code');
    const nameplate = /^[0-9]+$/.test(first) ? Number(first) : NaN;
    if (!(nameplate > 0 && nameplate <= 0xffff_ffff)) {
      throw new CodeError('bad_number', `a code starts with a number, like 7-lantern-zebra; got ${JSON.stringify(first)}`);
    }
    for (const w of parts) {
      if (!isWord(w)) {
        const suggestion = WORDS.find((c) => w.length >= 3 && c.startsWith(w.slice(0, 3))) ?? null;
        const hint = suggestion ? ` (did you mean ${JSON.stringify(suggestion)}?)` : '';
        throw new CodeError('unknown_word', `${JSON.stringify(w)} is not a code word${hint}`, { word: w, suggestion });
      }
    }
    if (parts.length < MIN_WORDS) {
      throw new CodeError('too_few_words', `a code has at least ${MIN_WORDS} words after the number; got ${parts.length}`);
    }
    return new Code(nameplate, parts);
  }

  /** The signaling room both sides meet in (the server learns only this). */
  room() {
    return `pair-${this.nameplate}`;
  }

  /** The key-exchange password: the code in its canonical form. */
  password() {
    return this.toString();
  }

  toString() {
    return [String(this.nameplate), ...this.words].join('-');
  }
}

/** @param {string} w */
function isWord(w) {
  let lo = 0;
  let hi = WORDS.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (WORDS[mid] < w) lo = mid + 1;
    else hi = mid;
  }
  return WORDS[lo] === w;
}
