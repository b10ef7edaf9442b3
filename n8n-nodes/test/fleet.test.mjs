// More than one machine: the nodes over several fake sidecars (placement, sticky chat, failover, a node that does
// not answer, totals), the queue's timeout and wait, the one model field. Real sidecars and a real n8n:
// tests/test_n8n_fleet.py.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const node = (dir) => require(`../dist/nodes/${dir}/${dir}.node.js`);
const { ModelOrchestratorChat } = node('ModelOrchestratorChat');
const { ModelOrchestratorCheckVram } = node('ModelOrchestratorCheckVram');
const { ModelOrchestratorLoadModel } = node('ModelOrchestratorLoadModel');
const { ModelOrchestratorUnloadModel, unloadTargets } = node('ModelOrchestratorUnloadModel');
const { LmChatModelOrchestrator } = node('LmChatModelOrchestrator');
const fleet = require('../dist/nodes/shared/fleet.js');
const placement = require('../dist/nodes/shared/placement.js');
const fleetChat = require('../dist/nodes/shared/fleet-chat.js');
const chatModel = require('../dist/nodes/shared/chat-model.js');
const { NodeApiError } = require('n8n-workflow');

const HELLO = (model) => ({
	id: 'c1',
	model,
	choices: [
		{ finish_reason: 'stop', message: { role: 'assistant', content: 'Hello from a tiny model!' } },
	],
	usage: { prompt_tokens: 5, completion_tokens: 6, total_tokens: 11 },
});
const refused = (url) =>
	Object.assign(new Error(`connect ECONNREFUSED ${url.slice(7)}`), { code: 'ECONNREFUSED' });
const httpError = (status, code, message) =>
	Object.assign(new Error(`Request failed with status code ${status}`), {
		response: { status, data: { error: { code, message, type: 'x' } } },
	});
const FITS = {
	fits: null,
	fits_after_eviction: true,
	evict: [],
	evictable: [],
	missing_mb: 0,
	gpu: null,
	reason: 'fits',
};
const EVICTS = (evict) => ({
	...FITS,
	evict,
	reason: `it fits after evicting ${evict.join(', ')}`,
});
const NO = {
	...FITS,
	fits_after_eviction: false,
	reason: 'at most 1 model, none may be evicted',
	refusal: 'too_many_models',
};

/**
 * Sidecars by URL: {node, models: [{id, status, aliases}], fit: {model: fit} (default FITS), status (GET
 * /models/status), down (refuses connections), hang (never answers: the request's timeout fires), chat(body),
 * load(body), unload(body), after(n): a hook run before the n-th request}. One fleet context for the nodes.
 */
function fleetContext({
	sidecars,
	credentialUrl,
	params,
	items = [{ json: {} }],
	continueOnFail = false,
	queueWaitMs = '250',
}) {
	const requests = [];
	const ctx = {
		requests,
		getInputData: () => items,
		getNode: () => ({
			id: '1',
			name: 'Node',
			type: 'x',
			typeVersion: 2,
			position: [0, 0],
			parameters: {},
		}),
		getNodeParameter: (name, i, fallback, options) => {
			let v = typeof params === 'function' ? params(name, i) : params[name];
			if (options?.extractValue && v && typeof v === 'object' && '__rl' in v) v = v.value;
			return v === undefined ? fallback : v;
		},
		getCredentials: async () => ({
			baseUrl: credentialUrl ?? Object.keys(sidecars).join(', '),
			apiKey: '',
		}),
		continueOnFail: () => continueOnFail,
		helpers: {
			httpRequestWithAuthentication: async function (type, o) {
				assert.equal(type, 'modelOrchestratorApi');
				const base = Object.keys(sidecars).find((u) => o.url.startsWith(u + '/'));
				const s = sidecars[base];
				const path = o.url.slice(base.length);
				requests.push({ ...o, sidecar: s.node, path });
				if (s.down) throw refused(base);
				if (s.hang)
					throw Object.assign(new Error(`timeout of ${o.timeout}ms exceeded`), {
						code: 'ECONNABORTED',
					});
				const body = answer(s, o, path);
				return o.returnFullResponse
					? { body, headers: { 'x-queue-wait-ms': queueWaitMs }, statusCode: 200 }
					: body;
			},
		},
	};
	return ctx;
}

function answer(s, o, path) {
	const models = (s.models ?? []).map((m) => ({ aliases: [], status: 'unloaded', ...m }));
	const find = (name) => models.find((m) => m.id === name || m.aliases.includes(name));
	if (path === '/fleet') return s.fleet ?? { node: s.node, fleet: null, members: [], errors: [] };
	if (path === '/models') return { node: s.node, default_model: models[0]?.id, models };
	if (path === '/models/status') {
		return {
			node: s.node,
			mode: 'cpu',
			total_mb: null,
			used_mb: null,
			free_mb: null,
			loaded_models: Object.fromEntries(
				models
					.filter((m) => m.status !== 'unloaded')
					.map((m) => [m.id, { model: m.id, status: m.status }]),
			),
			gpus: [],
			reservations: [],
			...s.status,
		};
	}
	if (path === '/models/estimate') {
		const fit = (s.fit ?? {})[o.body.model] ?? FITS;
		return {
			model: o.body.model,
			context_size: 512,
			cache_type: 'f16',
			estimate: { total_mb: 100 },
			fit,
		};
	}
	if (path === '/models/load') {
		if (s.load) return s.load(o.body);
		const m = find(o.body.model);
		const already = m.status === 'loaded';
		m.status = 'loaded';
		s.models = models;
		return {
			model: m.id,
			status: 'loaded',
			result: already ? 'already_loaded' : 'loaded',
			evicted: [],
			pid: 1,
			port: 2,
		};
	}
	if (path === '/models/unload') {
		if (s.unload) return s.unload(o.body);
		const m = find(o.body.model);
		if (!m) return { model: o.body.model, status: 'not_held', result: 'not_held', released: [] };
		const was = m.status;
		m.status = 'unloaded';
		s.models = models;
		return {
			model: m.id,
			status: 'unloaded',
			result: was === 'unloaded' ? 'not_loaded' : 'unloaded',
			released: [],
		};
	}
	if (path === '/v1/chat/completions') {
		if (s.chat) return s.chat(o.body);
		const m = find(o.body.model);
		m.status = 'loaded'; // loaded on demand
		s.models = models;
		return HELLO(m.id);
	}
	throw new Error(`unexpected ${o.method} ${path}`);
}

const chatParams = (model, options = {}) => ({
	model: { __rl: true, mode: 'list', value: model },
	messageMode: 'simple',
	userMessage: 'Hi',
	images: 'none',
	tools: '',
	options,
});
const A = 'http://a:8000';
const B = 'http://b:8000';
const C = 'http://c:8000';

test('credential: one URL, several (commas, spaces, new lines), /v1 and slashes dropped, no duplicates', () => {
	assert.deepEqual(
		fleet.credentialUrls('http://a:8000/v1/, b:8000\nhttp://a:8000 ;http://c:9000/'),
		['http://a:8000', 'http://b:8000', 'http://c:9000'],
	);
	assert.throws(() => fleet.credentialUrls(' , '), /no base URL/);
});

test('placement: held first (loaded before a load under way), then fits now (most free), then fewest evictions', () => {
	const c = (node, verdict, extra = {}) => ({
		node,
		url: node,
		verdict,
		reason: '',
		model: 'm',
		evict: [],
		freeMb: null,
		loaded: 0,
		...extra,
	});
	const ranked = placement.rank([
		c('refused', 'refused'),
		c('unknown', 'unknown'),
		c('evicts2', 'evicts', { evict: ['x', 'y'] }),
		c('evicts1', 'evicts', { evict: ['x'] }),
		c('fitsSmall', 'fits', { freeMb: 1000 }),
		c('fitsBig', 'fits', { freeMb: 9000 }),
		c('fitsCpuBusy', 'fits', { loaded: 2 }),
		c('fitsCpu', 'fits', { loaded: 1 }),
		c('loading', 'held', { state: 'loading' }),
		c('loaded', 'held', { state: 'loaded' }),
	]);
	assert.deepEqual(
		ranked.map((x) => x.node),
		[
			'loaded',
			'loading',
			'fitsBig',
			'fitsSmall',
			'fitsCpu',
			'fitsCpuBusy',
			'evicts1',
			'evicts2',
			'unknown',
			'refused',
		],
	);
	assert.equal(placement.verdictOf(FITS), 'fits');
	assert.equal(placement.verdictOf({ ...FITS, fits: true }), 'fits');
	assert.equal(placement.verdictOf({ ...FITS, fits: false }), 'fits'.replace('fits', 'evicts'));
	assert.equal(placement.verdictOf(EVICTS(['x'])), 'evicts');
	assert.equal(placement.verdictOf(NO), 'refused');
});

test("Load Model: the node that holds it; else where it fits now, by each sidecar's own verdict; output names the node", async () => {
	const sidecars = () => ({
		[A]: { node: 'gpu-a', models: [{ id: 'm1', status: 'loaded' }, { id: 'm2' }], fit: { m2: NO } },
		[B]: { node: 'gpu-b', models: [{ id: 'm2' }, { id: 'm3' }], fit: { m2: EVICTS(['m9']) } },
		[C]: { node: 'gpu-c', models: [{ id: 'm2' }, { id: 'm1' }], fit: { m2: FITS } },
	});
	const load = async (s, model, options = {}) => {
		const ctx = fleetContext({ sidecars: s, params: { model, wait: true, timeoutS: 60, options } });
		const [out] = await new ModelOrchestratorLoadModel().execute.call(ctx);
		return { ctx, json: out[0].json };
	};
	// m1 is loaded on gpu-a (gpu-c knows it too): gpu-a, without asking anyone for an estimate
	let { ctx, json } = await load(sidecars(), 'm1');
	assert.deepEqual(
		[json.node, json.result, json.placement],
		['gpu-a', 'already_loaded', 'm1 is loaded on gpu-a'],
	);
	assert.ok(!ctx.requests.some((r) => r.path === '/models/estimate'));
	// m2: gpu-a refuses (its cap), gpu-b only after evicting, gpu-c fits now: gpu-c
	({ ctx, json } = await load(sidecars(), 'm2'));
	assert.deepEqual([json.node, json.result], ['gpu-c', 'loaded']);
	assert.match(json.placement, /^m2 fits on gpu-c now/);
	assert.deepEqual(
		ctx.requests.filter((r) => r.path === '/models/load').map((r) => r.sidecar),
		['gpu-c'],
	);
	// without gpu-c's room: gpu-b, which evicts
	const s = sidecars();
	s[C].fit = { m2: NO };
	({ json } = await load(s, 'm2'));
	assert.deepEqual(
		[json.node, json.placement],
		['gpu-b', 'm2 fits on gpu-b after evicting m9: it fits after evicting m9'],
	);
	// asked for a node: that one, also when another holds the model (a second copy is asked for this way)
	({ json } = await load(sidecars(), 'm1', { node: 'gpu-c' }));
	assert.deepEqual([json.node, json.result], ['gpu-c', 'loaded']);
	// m3 only in gpu-b's registry
	// m3 only in gpu-b's registry: nothing to choose, its own load decides (no estimate asked)
	({ ctx, json } = await load(sidecars(), 'm3'));
	assert.deepEqual([json.node, json.placement], ['gpu-b', 'm3 is in the registry of gpu-b alone']);
	assert.ok(!ctx.requests.some((r) => r.path === '/models/estimate'));
});

test('Load Model: no node can take it: one error saying why for each node, and who did not answer', async () => {
	const ctx = fleetContext({
		sidecars: {
			[A]: { node: 'gpu-a', models: [{ id: 'm2' }], fit: { m2: NO } },
			[B]: { node: 'gpu-b', models: [{ id: 'other' }] },
			[C]: { node: 'gpu-c', down: true },
			'http://d:8000': { node: 'gpu-d', models: [{ id: 'm2' }], fit: { m2: NO } },
		},
		params: { model: 'm2', wait: true, timeoutS: 60, options: {} },
	});
	await assert.rejects(new ModelOrchestratorLoadModel().execute.call(ctx), (e) => {
		assert.ok(e instanceof NodeApiError);
		assert.equal(e.httpCode, '409');
		assert.match(
			e.message,
			/^m2 fits on no node now \(gpu-a: at most 1 model, none may be evicted; gpu-b: not in its registry \(known: other\); gpu-d: at most 1 model, none may be evicted; c:8000 \(http:\/\/c:8000\) did not answer: connect ECONNREFUSED/,
		);
		return true;
	});
	assert.ok(!ctx.requests.some((r) => r.path === '/models/load'));
});

test('Load Model: a sidecar that cannot estimate the model (unreadable file) still gets the load: its own answer', async () => {
	const ctx = fleetContext({
		sidecars: {
			[A]: { node: 'gpu-a', models: [{ id: 'broken' }], fit: { broken: NO } },
			[B]: {
				node: 'gpu-b',
				models: [{ id: 'broken' }],
				load: () => ({ model: 'broken', status: 'loading', result: 'loading' }),
			},
		},
		params: {
			model: 'broken',
			wait: false,
			timeoutS: 60,
			options: { callbackUrl: 'http://n8n/hook' },
		},
	});
	const estimate = ctx.helpers.httpRequestWithAuthentication;
	ctx.helpers.httpRequestWithAuthentication = async function (type, o) {
		if (o.url === `${B}/models/estimate`) {
			ctx.requests.push({ ...o, sidecar: 'gpu-b', path: '/models/estimate' });
			throw httpError(422, 'unreadable_model', 'cannot read the GGUF header of broken');
		}
		return await estimate.call(this, type, o);
	};
	const [out] = await new ModelOrchestratorLoadModel().execute.call(ctx);
	assert.deepEqual([out[0].json.node, out[0].json.result], ['gpu-b', 'loading']);
	assert.match(
		out[0].json.placement,
		/broken goes to gpu-b, which could not estimate it: gpu-b: cannot read/,
	);
	// Check VRAM has no verdict to give: the sidecar's own error
	const check = fleetContext({
		sidecars: { [B]: { node: 'gpu-b', models: [{ id: 'broken' }] } },
		params: { check: 'model', model: 'broken' },
	});
	const inner = check.helpers.httpRequestWithAuthentication;
	check.helpers.httpRequestWithAuthentication = async function (type, o) {
		if (o.url.endsWith('/models/estimate'))
			throw httpError(422, 'unreadable_model', 'cannot read the GGUF header');
		return await inner.call(this, type, o);
	};
	await assert.rejects(new ModelOrchestratorCheckVram().execute.call(check), (e) => {
		assert.equal(e.message, 'gpu-b: cannot read the GGUF header');
		assert.equal(e.httpCode, '422');
		return true;
	});
});

test('Load Model: the room was taken since the estimate (409 there): the next candidate', async () => {
	const ctx = fleetContext({
		sidecars: {
			[A]: {
				node: 'gpu-a',
				models: [{ id: 'm' }],
				load: () => {
					throw httpError(409, 'too_many_models', 'full now');
				},
			},
			[B]: { node: 'gpu-b', models: [{ id: 'm' }], fit: { m: EVICTS(['x']) } },
		},
		params: { model: 'm', wait: true, timeoutS: 60, options: {} },
	});
	const [out] = await new ModelOrchestratorLoadModel().execute.call(ctx);
	assert.equal(out[0].json.node, 'gpu-b');
	assert.deepEqual(
		ctx.requests.filter((r) => r.path === '/models/load').map((r) => r.sidecar),
		['gpu-a', 'gpu-b'],
	);
});

test('Chat: sticky to the node that holds the model; the Timeout goes to its queue; output: node and queue wait', async () => {
	const sidecars = {
		[A]: { node: 'gpu-a', models: [{ id: 'm1' }, { id: 'm2' }] },
		[B]: { node: 'gpu-b', models: [{ id: 'm2', status: 'loaded', aliases: ['two'] }] },
	};
	const ctx = fleetContext({
		sidecars,
		params: chatParams('two', { timeoutS: 30 }),
		queueWaitMs: '2345',
	});
	const [out] = await new ModelOrchestratorChat().execute.call(ctx);
	const chats = ctx.requests.filter((r) => r.path === '/v1/chat/completions');
	assert.deepEqual(
		chats.map((r) => r.sidecar),
		['gpu-b'],
	);
	assert.equal(chats[0].headers['X-Queue-Timeout-S'], '30');
	assert.equal(chats[0].timeout, 35_000); // the sidecar's queue_timeout answer comes first
	assert.deepEqual(
		[out[0].json.node, out[0].json.queue_wait_s, out[0].json.content],
		['gpu-b', 2.345, 'Hello from a tiny model!'],
	);
	assert.ok(!ctx.requests.some((r) => r.path === '/models/estimate'), 'held: no estimate asked');
	// a sidecar without X-Queue-Wait-Ms (older): queue_wait_s is null
	assert.equal(fleetChat.queueWaitS({}), null);
	assert.equal(fleetChat.queueWaitS({ 'X-Queue-Wait-Ms': '0' }), 0);
});

test("Chat: the sidecar's queue gave up (503 queue_timeout): an error naming the node, no other node asked", async () => {
	const ctx = fleetContext({
		sidecars: {
			[A]: {
				node: 'gpu-a',
				models: [{ id: 'm', status: 'loaded' }],
				chat: () => {
					throw httpError(503, 'queue_timeout', 'waited 30 s for m behind 4 requests');
				},
			},
			[B]: { node: 'gpu-b', models: [{ id: 'm' }] },
		},
		params: chatParams('m', { timeoutS: 30 }),
	});
	await assert.rejects(new ModelOrchestratorChat().execute.call(ctx), (e) => {
		assert.equal(e.message, 'gpu-a: waited 30 s for m behind 4 requests');
		assert.match(e.description, /code: queue_timeout, HTTP 503, node: gpu-a/);
		return true;
	});
	assert.equal(ctx.requests.filter((r) => r.path === '/v1/chat/completions').length, 1);
});

test('Chat: the holder stops answering mid-run: its items go to another node, which is then sticky; it is not asked again', async () => {
	const sidecars = {
		[A]: { node: 'gpu-a', models: [{ id: 'm', status: 'loaded' }] },
		[B]: { node: 'gpu-b', models: [{ id: 'm' }] },
		[C]: { node: 'gpu-c', models: [{ id: 'other' }] },
	};
	let chats = 0;
	sidecars[A].chat = (body) => {
		if (++chats === 2) sidecars[A].down = true; // gpu-a dies while answering the second item
		if (sidecars[A].down) throw Object.assign(new Error('socket hang up'), { code: 'ECONNRESET' });
		return HELLO(body.model);
	};
	const items = [{ json: {} }, { json: {} }, { json: {} }, { json: {} }];
	const ctx = fleetContext({ sidecars, items, params: chatParams('m') });
	const [out] = await new ModelOrchestratorChat().execute.call(ctx);
	assert.deepEqual(
		out.map((o) => o.json.node),
		['gpu-a', 'gpu-b', 'gpu-b', 'gpu-b'],
	);
	const afterDeath = ctx.requests.slice(
		ctx.requests.findIndex(
			(r) => r.sidecar === 'gpu-a' && r.path === '/v1/chat/completions' && chats === 2,
		) + 1,
	);
	assert.equal(
		ctx.requests.filter((r) => r.sidecar === 'gpu-a').length,
		2 + 2,
		'two surveys and two chats, then never again',
	);
	assert.ok(afterDeath.length > 0);
});

test('Chat: every node gone: the run ends with an error naming each node', async () => {
	const sidecars = {
		[A]: { node: 'gpu-a', models: [{ id: 'm', status: 'loaded' }] },
		[B]: { node: 'gpu-b', models: [{ id: 'm' }] },
	};
	for (const s of Object.values(sidecars)) {
		s.chat = () => {
			s.down = true;
			throw refused('x');
		};
	}
	const ctx = fleetContext({
		sidecars,
		params: chatParams('m'),
		items: [{ json: {} }, { json: {} }],
		continueOnFail: true,
	});
	const [out] = await new ModelOrchestratorChat().execute.call(ctx);
	assert.equal(out.length, 2);
	for (const o of out) {
		assert.match(
			o.json.error,
			/No sidecar answered.*: .*gpu-a \(http:\/\/a:8000\) did not answer.*gpu-b \(http:\/\/b:8000\) did not answer/,
		);
	}
});

test('a node that does not answer is skipped after the probe timeout with a message; the others answer', async () => {
	const ctx = fleetContext({
		sidecars: {
			[A]: {
				node: 'gpu-a',
				models: [{ id: 'm', status: 'loaded' }],
				status: {
					mode: 'gpu',
					total_mb: 32000,
					used_mb: 2000,
					free_mb: 30000,
					utilization_percent: 10,
					gpus: [{ index: 0, name: '5090', free_mb: 30000 }],
				},
			},
			[B]: { node: 'gpu-b', hang: true },
			[C]: {
				node: 'gpu-c',
				models: [
					{ id: 'm', status: 'loaded' },
					{ id: 'e', status: 'loaded' },
				],
				status: {
					mode: 'gpu',
					total_mb: 24000,
					used_mb: 4000,
					free_mb: 20000,
					utilization_percent: 30,
					gpus: [
						{ index: 0, name: '4090', free_mb: 20000 },
						{ index: 1, name: '4090', free_mb: 0 },
					],
				},
			},
		},
		params: { check: 'none' },
	});
	const [[item]] = await new ModelOrchestratorCheckVram().execute.call(ctx);
	const st = item.json;
	assert.deepEqual(
		[st.total_mb, st.used_mb, st.free_mb, st.utilization_percent, st.mode, st.node],
		[56000, 6000, 50000, 20, 'gpu', null],
	);
	assert.deepEqual(
		st.nodes.map((n) => n.node),
		['gpu-a', 'gpu-c'],
	);
	assert.deepEqual(
		st.gpus.map((g) => [g.node, g.name]),
		[
			['gpu-a', '5090'],
			['gpu-c', '4090'],
			['gpu-c', '4090'],
		],
	);
	// a model loaded on two nodes shows twice
	assert.deepEqual(Object.keys(st.loaded_models), ['m', 'm@gpu-c', 'e']);
	assert.equal(st.loaded_models.e.node, 'gpu-c');
	assert.equal(st.skipped.length, 1);
	assert.match(
		st.skipped[0].message,
		/^b:8000 \(http:\/\/b:8000\) did not answer: timeout of 5000ms exceeded/,
	);
	assert.ok(
		ctx.requests
			.filter((r) => r.sidecar === 'gpu-b')
			.every((r) => r.timeout === fleet.PROBE_TIMEOUT_MS),
	);
});

test('Check VRAM: one node is the status as it is (plus its node); requiredMb: enough when one node has it', async () => {
	const status = {
		mode: 'gpu',
		total_mb: 1000,
		used_mb: 100,
		free_mb: 900,
		utilization_percent: 5,
		driver_version: '580',
		note: null,
	};
	const one = fleetContext({
		sidecars: { [A]: { node: 'gpu-a', status } },
		params: { check: 'none' },
	});
	const [[item]] = await new ModelOrchestratorCheckVram().execute.call(one);
	assert.deepEqual(
		[item.json.node, item.json.free_mb, item.json.driver_version, item.json.skipped],
		['gpu-a', 900, '580', []],
	);
	const ctx = fleetContext({
		sidecars: {
			[A]: { node: 'gpu-a', status },
			[B]: { node: 'gpu-b', status: { ...status, free_mb: 5000 } },
		},
		params: { check: 'requiredMb', requiredMb: 4000, whenNoGpu: 'notEnough' },
	});
	const [enough, notEnough] = await new ModelOrchestratorCheckVram().execute.call(ctx);
	assert.deepEqual([enough.length, notEnough.length], [1, 0]);
	const check = enough[0].json.vram_check;
	assert.deepEqual(
		[check.node, check.free_mb, check.reason],
		['gpu-b', 5000, 'gpu-b: 5000 MB free >= 4000 MB required'],
	);
	assert.deepEqual(
		check.nodes.map((n) => [n.node, n.enough]),
		[
			['gpu-a', false],
			['gpu-b', true],
		],
	);
	assert.equal(enough[0].json.free_mb, 5900);
});

test("Check VRAM, enough for a model: the node Load Model would pick, and every node's verdict", async () => {
	const ctx = fleetContext({
		sidecars: {
			[A]: { node: 'gpu-a', models: [{ id: 'm' }], fit: { m: NO } },
			[B]: { node: 'gpu-b', models: [{ id: 'm' }], fit: { m: EVICTS(['idle']) } },
		},
		params: {
			check: 'model',
			model: { __rl: true, mode: 'id', value: 'm' },
			whenEviction: 'notEnough',
		},
	});
	const [enough, notEnough] = await new ModelOrchestratorCheckVram().execute.call(ctx);
	assert.deepEqual([enough.length, notEnough.length], [0, 1]);
	const check = notEnough[0].json.vram_check;
	assert.equal(check.node, 'gpu-b');
	assert.deepEqual(check.fit.evict, ['idle']);
	assert.deepEqual(
		check.nodes.map((n) => [n.node, n.verdict]),
		[
			['gpu-b', 'evicts'],
			['gpu-a', 'refused'],
		],
	);
});

test('Unload Model: on the node that holds it (each, when several do); held nowhere: not_loaded; another name: every node', async () => {
	const sidecars = () => ({
		[A]: { node: 'gpu-a', models: [{ id: 'm', status: 'loaded' }, { id: 'n' }] },
		[B]: { node: 'gpu-b', models: [{ id: 'm', status: 'loaded' }] },
		[C]: { node: 'gpu-c', models: [{ id: 'n' }] },
	});
	const unload = async (name) => {
		const ctx = fleetContext({
			sidecars: sidecars(),
			params: { model: { __rl: true, mode: 'id', value: name }, force: true },
		});
		const [out] = await new ModelOrchestratorUnloadModel().execute.call(ctx);
		return {
			json: out[0].json,
			posts: ctx.requests.filter((r) => r.path === '/models/unload').map((r) => r.sidecar),
		};
	};
	let r = await unload('m');
	assert.deepEqual(r.posts, ['gpu-a', 'gpu-b']);
	assert.deepEqual([r.json.result, r.json.node], ['unloaded', 'gpu-a']);
	assert.deepEqual(
		r.json.nodes.map((n) => [n.node, n.result]),
		[
			['gpu-a', 'unloaded'],
			['gpu-b', 'unloaded'],
		],
	);
	r = await unload('n');
	assert.deepEqual([r.posts, r.json.result, r.json.node], [['gpu-a'], 'not_loaded', 'gpu-a']);
	r = await unload('wan2.1-14b');
	assert.deepEqual([r.posts, r.json.result], [['gpu-a', 'gpu-b', 'gpu-c'], 'not_held']);
	assert.deepEqual(unloadTargets([], 'x'), { urls: [], holders: false });
});

test('one URL whose sidecar lists the fleet (GET /fleet) reaches every member', async () => {
	const sidecars = {
		[A]: {
			node: 'gpu-a',
			models: [{ id: 'm' }],
			fleet: { node: 'gpu-a', fleet: 'mo.svc', members: [A, B], errors: [] },
		},
		[B]: { node: 'gpu-b', models: [{ id: 'm', status: 'loaded' }] },
	};
	const ctx = fleetContext({
		sidecars,
		credentialUrl: 'http://a:8000/v1',
		params: chatParams('m'),
	});
	const [out] = await new ModelOrchestratorChat().execute.call(ctx);
	assert.equal(out[0].json.node, 'gpu-b');
	assert.deepEqual(
		ctx.requests
			.filter((r) => r.path === '/models')
			.map((r) => r.sidecar)
			.sort(),
		['gpu-a', 'gpu-b'],
	);
});

test('Chat Model sub-node: each request to the holder, X-Queue-Timeout-S, node and queue wait in the result', async () => {
	const sidecars = {
		[A]: { node: 'gpu-a', models: [{ id: 'm' }] },
		[B]: { node: 'gpu-b', models: [{ id: 'm', status: 'loaded' }] },
	};
	const ctx = fleetContext({
		sidecars,
		params: {
			model: { __rl: true, mode: 'list', value: 'm' },
			options: { timeoutS: 90, temperature: 0.2 },
		},
	});
	const f = await fleet.Fleet.open(ctx);
	const model = new chatModel.FleetChatModel(
		async (body) => await fleetChat.chatOnFleet(f, 'm', fleetChat.chatRequest(body, 90), 0),
		'm',
		{ temperature: 0.2 },
	);
	const result = await model.generate([{ role: 'user', content: [{ type: 'text', text: 'Hi' }] }]);
	assert.deepEqual(result.providerMetadata, { node: 'gpu-b', queue_wait_s: 0.25, model: 'm' });
	assert.equal(result.finishReason, 'stop');
	assert.deepEqual(result.message.content, [{ type: 'text', text: 'Hello from a tiny model!' }]);
	const chat = ctx.requests.find((r) => r.path === '/v1/chat/completions');
	assert.deepEqual(
		[chat.sidecar, chat.headers['X-Queue-Timeout-S'], chat.body.temperature],
		['gpu-b', '90', 0.2],
	);
	// streaming: the same answer, in chunks
	const chunks = [];
	for await (const c of model.stream([{ role: 'user', content: [{ type: 'text', text: 'Hi' }] }]))
		chunks.push(c.type);
	assert.deepEqual(chunks, ['text-delta', 'finish']);
});

test('Chat Model sub-node: messages, images, tool calls and results to OpenAI and back', () => {
	const messages = chatModel.toOpenAiMessages([
		{ role: 'system', content: [{ type: 'text', text: 'Be brief.' }] },
		{
			role: 'user',
			content: [
				{ type: 'text', text: 'What is this?' },
				{ type: 'file', mediaType: 'image/png', data: 'QUJD' },
			],
		},
		{
			role: 'assistant',
			content: [
				{ type: 'tool-call', toolCallId: 't1', toolName: 'get_weather', input: '{"city":"Paris"}' },
			],
		},
		{ role: 'tool', content: [{ type: 'tool-result', toolCallId: 't1', result: { temp: 20 } }] },
	]);
	assert.deepEqual(messages, [
		{ role: 'system', content: 'Be brief.' },
		{
			role: 'user',
			content: [
				{ type: 'text', text: 'What is this?' },
				{ type: 'image_url', image_url: { url: 'data:image/png;base64,QUJD' } },
			],
		},
		{
			role: 'assistant',
			content: null,
			tool_calls: [
				{
					id: 't1',
					type: 'function',
					function: { name: 'get_weather', arguments: '{"city":"Paris"}' },
				},
			],
		},
		{ role: 'tool', tool_call_id: 't1', content: '{"temp":20}' },
	]);
	const result = chatModel.fromOpenAiResponse({
		node: 'gpu-a',
		queue_wait_s: 0,
		body: {
			id: 'x',
			model: 'm',
			choices: [
				{
					finish_reason: 'tool_calls',
					message: {
						content: '',
						tool_calls: [{ id: 't2', function: { name: 'f', arguments: '{"a":1}' } }],
					},
				},
			],
		},
	});
	assert.equal(result.finishReason, 'tool-calls');
	assert.deepEqual(result.message.content, [
		{ type: 'tool-call', toolCallId: 't2', toolName: 'f', input: '{"a":1}' },
	]);
	const withTools = new chatModel.FleetChatModel(async () => assert.fail(), 'm').withTools([
		{
			type: 'function',
			name: 'f',
			description: 'd',
			inputSchema: { type: 'object', properties: {} },
		},
	]);
	assert.deepEqual(withTools.body([]).tools, [
		{
			type: 'function',
			function: { name: 'f', description: 'd', parameters: { type: 'object', properties: {} } },
		},
	]);
});

test('Chat Model sub-node: the tracer that writes its output gets the node and queue wait (generationInfo)', async () => {
	let logged;
	const tracer = { handleLLMEnd: async (output) => (logged = output) };
	chatModel.showNodeInOutput({ callbacks: [tracer] });
	await tracer.handleLLMEnd({
		generations: [
			[{ text: 'hi', message: { response_metadata: { node: 'gpu-b', queue_wait_s: 1.2 } } }],
		],
	});
	assert.deepEqual(logged.generations[0][0].generationInfo, { node: 'gpu-b', queue_wait_s: 1.2 });
	chatModel.showNodeInOutput({}); // any other shape: nothing happens
	// an agent binds its tools: the new model's tracer too
	let boundLogged;
	const adapter = {
		callbacks: [],
		bindTools: () => ({ callbacks: [{ handleLLMEnd: async (output) => (boundLogged = output) }] }),
	};
	chatModel.showNodeInOutput(adapter);
	const bound = adapter.bindTools([]);
	await bound.callbacks[0].handleLLMEnd({
		generations: [
			[{ text: 'hi', message: { response_metadata: { node: 'gpu-c', queue_wait_s: 0 } } }],
		],
	});
	assert.deepEqual(boundLogged.generations[0][0].generationInfo, {
		node: 'gpu-c',
		queue_wait_s: 0,
	});
});

test('one model field: the same resource locator and picker in every node; version 1 keeps its plain field', () => {
	const nodes = [
		ModelOrchestratorCheckVram,
		ModelOrchestratorLoadModel,
		ModelOrchestratorChat,
		LmChatModelOrchestrator,
	];
	const strip = (p) => ({ ...p, description: undefined, displayOptions: undefined });
	const unload = new ModelOrchestratorUnloadModel();
	const reference = strip(unload.description.properties.find((p) => p.name === 'model'));
	assert.equal(reference.type, 'resourceLocator');
	for (const N of nodes) {
		const n = new N();
		assert.deepEqual(n.description.version, [1, 2], N.name);
		assert.equal(n.description.defaultVersion, 2, N.name);
		const fields = n.description.properties.filter((p) => p.name === 'model');
		assert.equal(fields.length, 2, N.name);
		const [v1, v2] = fields;
		assert.deepEqual(v1.displayOptions.show['@version'], [1]);
		assert.equal(v1.type, 'options');
		assert.deepEqual(v2.displayOptions.show['@version'], [2]);
		assert.deepEqual(strip(v2), reference, N.name);
		assert.equal(n.methods.listSearch.searchModels, unload.methods.listSearch.searchModels, N.name);
	}
});
