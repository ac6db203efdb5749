// A small typed event emitter: the library's objects report what happens
// through it (the Rust side returns events from poll; JavaScript calls back).

/**
 * @template {Record<string, any>} Events  event name -> payload
 */
export class Emitter {
  constructor() {
    /** @type {Map<keyof Events, Set<(payload: any) => void>>} */
    this._listeners = new Map();
  }

  /**
   * Calls `fn` with every `type` event until the returned function is called.
   * @template {keyof Events} K
   * @param {K} type
   * @param {(payload: Events[K]) => void} fn
   * @returns {() => void}
   */
  on(type, fn) {
    let set = this._listeners.get(type);
    if (!set) {
      set = new Set();
      this._listeners.set(type, set);
    }
    set.add(fn);
    return () => set.delete(fn);
  }

  /**
   * The next `type` event for which `pred` holds, within `timeoutMs`.
   * @template {keyof Events} K
   * @param {K} type
   * @param {(payload: Events[K]) => boolean} [pred]
   * @param {number} [timeoutMs]
   * @returns {Promise<Events[K]>}
   */
  once(type, pred = () => true, timeoutMs = 30_000) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        off();
        reject(new Error(`no ${String(type)} event within ${timeoutMs} ms`));
      }, timeoutMs);
      const off = this.on(type, (payload) => {
        if (!pred(payload)) return;
        clearTimeout(timer);
        off();
        resolve(payload);
      });
    });
  }

  /**
   * @template {keyof Events} K
   * @param {K} type
   * @param {Events[K]} payload
   */
  emit(type, payload) {
    for (const fn of [...(this._listeners.get(type) ?? [])]) {
      try {
        fn(payload);
      } catch (e) {
        // A listener's bug must not break the emitter's owner.
        console.error(`peerlink: a ${String(type)} listener threw`, e);
      }
    }
  }
}
