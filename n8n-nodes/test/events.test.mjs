// Unit tests of the trigger's event-stream reading: run with `node --test "test/*.test.mjs"` after `n8n-node build`.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const events = require('../dist/nodes/shared/events.js');
const {
	buildLoadBody,
} = require('../dist/nodes/ModelOrchestratorLoadModel/ModelOrchestratorLoadModel.node.js');

test('SSE parser: events split across chunks, comments skipped, last id kept', () => {
	const p = new events.SseParser();
	assert.deepEqual(p.push(': model-orchestrator events\nretry: 2000\n\n'), []);
	assert.deepEqual(p.push('id: 7\nevent: loaded\ndata: {"model":"ti'), []);
	const out = p.push('ny","load_seconds":0.5}\n\n: keepalive\n\nid: 8\r\nevent: evicted\r\ndata: {"model":"a","by":"b"}\r\n\r\n');
	assert.deepEqual(out, [
		{ id: '7', event: 'loaded', data: { model: 'tiny', load_seconds: 0.5 } },
		{ id: '8', event: 'evicted', data: { model: 'a', by: 'b' } },
	]);
	assert.equal(p.lastEventId, '8');
});

test('trigger choices map to the sidecar event types', () => {
	assert.deepEqual(events.eventsQuery(['loaded', 'failed', 'memoryLow'], ['']), {
		types: 'loaded,load_failed,crashed,memory_low',
	});
	assert.deepEqual(events.eventsQuery(['evicted'], [' tiny', 'big ']), { types: 'evicted', model: 'tiny,big' });
});

test('callback URL is sent only when the load does not wait', () => {
	const url = 'http://n8n:5678/webhook-waiting/1';
	assert.equal(buildLoadBody('tiny', false, 600, { callbackUrl: url }).callback_url, url);
	assert.equal(buildLoadBody('tiny', true, 600, { callbackUrl: url }).callback_url, undefined);
	assert.equal(buildLoadBody('tiny', false, 600, {}).callback_url, undefined);
});
