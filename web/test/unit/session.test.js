// fixtures/pairing/session.json replayed step by step, as the Rust session
// replays it (crates/pair/tests/session.rs).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';

import { Code } from '../../lib/pair/code.js';
import { Pairing } from '../../lib/pair/pake.js';
import { Session } from '../../lib/pair/session.js';

const fixture = JSON.parse(readFileSync(new URL('../../../fixtures/pairing/session.json', import.meta.url), 'utf8'));
const other = (r) => (r === 'creator' ? 'joiner' : 'creator');

/** An output as the fixture writes it. */
function describe(o) {
  switch (o.type) {
    case 'send': {
      const s = { to: o.to, type: o.msg.type };
      if (o.msg.type === 'pair_abort' && o.msg.code) s.code = o.msg.code;
      return { send: s };
    }
    case 'connect': return { connect: o.peer };
    case 'peer_seen': return { event: 'peer_seen', peer: o.peer };
    case 'paired': return { event: 'paired', peer: o.peer };
    case 'notice': return { event: 'notice', notice: o.notice };
    case 'peer_gone': return { event: 'peer_gone', peer: o.peer, was_paired: o.wasPaired };
    case 'ended': return { event: 'ended', reason: o.reason.code, by_peer: o.byPeer };
    default: return { event: 'other' };
  }
}

for (const sc of fixture.scenarios) {
  test(sc.name, () => {
    const session = new Session(sc.role, Code.parse(sc.code), sc.timeout_ms);
    const counterparts = new Map();
    const lastPake = new Map();
    sc.steps.forEach((step, i) => {
      const now = step.at_ms;
      const input = step.input;
      let late = null;
      if (input.peer_joined) session.peerJoined(input.peer_joined, now);
      else if (input.peer_left) session.peerLeft(input.peer_left, now);
      else if (input.connection_lost) session.connectionLost(input.connection_lost);
      else if (input.timeout) session.handleTimeout(now);
      else if (input.abort) session.abort({ code: input.abort.code, detail: input.abort.reason });
      else if (input.message) {
        const m = input.message;
        let msg;
        if (m.counterpart === 'pake') {
          const [pairing, first] = Pairing.start(other(sc.role), Code.parse(m.code));
          counterparts.set(m.from, { pairing, confirm: null });
          if (lastPake.has(m.from)) late = [m.from, lastPake.get(m.from)];
          msg = first;
        } else if (m.counterpart === 'confirm') {
          const c = counterparts.get(m.from);
          assert.ok(c?.confirm, `${sc.name} step ${i}: the counterpart has a confirmation`);
          msg = c.confirm;
          c.confirm = null;
        } else {
          msg = m.msg;
        }
        session.handleMessage(m.from, msg, now);
      } else {
        assert.fail(`unknown input ${JSON.stringify(input)}`);
      }
      const got = [];
      for (let o = session.poll(); o; o = session.poll()) {
        if (o.type === 'send' && o.msg.type === 'pair_pake') {
          lastPake.set(o.to, o.msg);
          if (late && late[0] === o.to) late = null;
        }
        if (o.type === 'send' && o.msg.type !== 'pair_abort') {
          const c = counterparts.get(o.to);
          if (c) {
            try {
              const reply = c.pairing.handle(o.msg);
              if (reply) c.confirm = reply;
            } catch { /* the counterpart refuses: the session will find out */ }
          }
        }
        got.push(describe(o));
      }
      if (late) {
        const c = counterparts.get(late[0]);
        try { c.confirm = c.pairing.handle(late[1]); } catch { c.confirm = null; }
      }
      assert.deepEqual(got, step.expect, `${sc.name}, step ${i}`);
    });
  });
}

test('the fixture covers the rules', () => {
  assert.ok(fixture.scenarios.length >= 10);
});
