// The transfer's errors (Rust: crates/transfer/src/error.rs): what is wrong
// with a path or a manifest, and what a peer did wrong. Each says which
// `cancel` code the other side gets.

/** A manifest path that breaks a rule. */
export class PathError extends Error {
  /**
   * @param {'empty' | 'too_long' | 'too_many_components' | 'absolute' | 'drive_letter' | 'empty_component' | 'dot_component' | 'backslash' | 'control_char'} kind
   * @param {string} message
   */
  constructor(kind, message) {
    super(message);
    this.name = 'PathError';
    this.kind = kind;
  }
}

/** A manifest that breaks a rule; the receiver cancels with `bad_manifest`. */
export class ManifestError extends Error {
  /** @param {string} kind @param {string} message */
  constructor(kind, message) {
    super(message);
    this.name = 'ManifestError';
    this.kind = kind;
  }
}

/** The other side broke the protocol (or a limit): cancel with {@link ProtocolError.cancelCode}. */
export class ProtocolError extends Error {
  /**
   * @param {string} kind  `json`, `ctl_too_long`, `short_frame`, `bad_manifest`, `too_large`, `version`,
   *   `unexpected`, `no_such_file`, `bad_range`, `unasked_hashes`, `hash_count`, `bad_hashes`,
   *   `unasked_frame`, `frame_crosses_chunk`, `chunk_retries`, `changed`, `text_not_utf8`,
   *   `done_mismatch`, `too_many_requests`
   * @param {string} message
   */
  constructor(kind, message) {
    super(message);
    this.name = 'ProtocolError';
    this.kind = kind;
  }

  /** The `cancel` code the other side is told. */
  cancelCode() {
    switch (this.kind) {
      case 'bad_manifest': return 'bad_manifest';
      case 'too_large': return 'too_large';
      case 'changed': return 'changed';
      default: return 'protocol';
    }
  }

  /** @param {ManifestError | PathError} e */
  static badManifest(e) {
    return new ProtocolError('bad_manifest', `bad manifest: ${e.message}`);
  }
}
