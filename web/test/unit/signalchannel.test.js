// fixtures/peer/signal-channel.json: the messages connected peers send on
// their signaling channel read as the fixture says, and a signal written
// back is the same text (the native peer checks the same file).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { parseChannelSignal, SIGNAL_LABEL, SIGNAL_HELLO } from '../../lib/protocol.js';

const fixture = JSON.parse(readFileSync(new URL('../../../fixtures/peer/signal-channel.json', import.meta.url), 'utf8'));

test('signaling channel messages match the fixture', () => {
  assert.equal(fixture.label, SIGNAL_LABEL);
  assert.equal(fixture.messages.length, 6);
  for (const m of fixture.messages) {
    const parsed = parseChannelSignal(m.text);
    if ('hello' in parsed) {
      assert.equal(m.name, 'hello');
      assert.equal(m.text, SIGNAL_HELLO);
    } else if ('signal' in parsed) {
      assert.equal(JSON.stringify(parsed.signal), m.text, m.name);
    } else {
      assert.equal(m.ignored, true, `${m.name}: ${parsed.ignored}`);
    }
  }
  assert.ok('ignored' in parseChannelSignal('not json'));
  assert.ok('ignored' in parseChannelSignal('{"kind":"offer"}'), 'an offer without sdp is not applied');
});
