// The nodes' execute() with a fake n8n context: what goes over the wire, outputs, errors, continue on fail.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const {
	ModelOrchestratorChat,
} = require('../dist/nodes/ModelOrchestratorChat/ModelOrchestratorChat.node.js');
const {
	ModelOrchestratorCheckVram,
} = require('../dist/nodes/ModelOrchestratorCheckVram/ModelOrchestratorCheckVram.node.js');
const {
	ModelOrchestratorLoadModel,
} = require('../dist/nodes/ModelOrchestratorLoadModel/ModelOrchestratorLoadModel.node.js');
const {
	ModelOrchestratorUnloadModel,
	buildUnloadBody,
} = require('../dist/nodes/ModelOrchestratorUnloadModel/ModelOrchestratorUnloadModel.node.js');
const { NodeApiError, NodeOperationError } = require('n8n-workflow');

/** The sidecar's 404 for a route it does not have (an older sidecar without GET /fleet). */
function notFoundRoute() {
	const e = new Error('Request failed with status code 404');
	e.response = { status: 404, data: { error: { code: 'not_found', message: 'no such route', type: 'x' } } };
	throw e;
}

/** GET /models of a sidecar named gpu-a: the registry with each model's state. */
const registry = (models) => ({
	node: 'gpu-a',
	default_model: models[0]?.id ?? 'tiny',
	models: models.map((m) => ({ aliases: [], status: 'unloaded', ...m })),
});
const isGet = (o, path) => o.method === 'GET' && o.url.endsWith(path);

/**
 * A fake n8n context in front of one sidecar (http://sidecar:8000). GET /fleet answers 404 (an older sidecar: the
 * credential's one URL is the fleet) and is not recorded; `models` answers GET /models (every model loaded unless
 * said otherwise); answers to a request with returnFullResponse come with X-Queue-Wait-Ms: `queueWaitMs`.
 */
function fakeContext({
	items,
	params,
	respond,
	continueOnFail = false,
	credentials,
	models = [{ id: 'tiny', status: 'loaded' }, { id: 'tiny-vision', status: 'loaded' }, { id: 'tiny-lora', status: 'loaded' }],
	queueWaitMs = '1500',
}) {
	const requests = [];
	const ctx = {
		requests,
		getInputData: () => items,
		getNode: () => ({
			id: '1',
			name: 'Node',
			type: 'x',
			typeVersion: 1,
			position: [0, 0],
			parameters: {},
		}),
		getNodeParameter: (name, i, fallback, options) => {
			let v = typeof params === 'function' ? params(name, i) : params[name];
			if (options?.extractValue && v && typeof v === 'object' && '__rl' in v) v = v.value;
			return v === undefined ? fallback : v;
		},
		getCredentials: async () => credentials ?? { baseUrl: 'http://sidecar:8000/', apiKey: '' },
		continueOnFail: () => continueOnFail,
		helpers: {
			httpRequestWithAuthentication: async function (credentialType, options) {
				assert.equal(credentialType, 'modelOrchestratorApi');
				if (options.url.endsWith('/fleet')) return notFoundRoute();
				requests.push(options);
				if (isGet(options, '/models') && models) {
					return registry(typeof models === 'function' ? models() : models);
				}
				const body = await respond(options);
				return options.returnFullResponse
					? { body, headers: { 'x-queue-wait-ms': queueWaitMs }, statusCode: 200 }
					: body;
			},
			getBinaryDataBuffer: async (i, name) => Buffer.from(items[i].binary[name].data, 'base64'),
		},
	};
	return ctx;
}

const HELLO = {
	id: 'x',
	model: 'tiny-vision',
	choices: [
		{ finish_reason: 'stop', message: { role: 'assistant', content: 'Hello from a tiny model!' } },
	],
	usage: { prompt_tokens: 20, completion_tokens: 6, total_tokens: 26 },
};

test('Chat: binary image of the item goes out as a data URL; output has content, usage, finish_reason', async () => {
	const png = Buffer.from('89504e470d0a1a0a', 'hex').toString('base64');
	const ctx = fakeContext({
		items: [
			{
				json: {},
				binary: {
					data: { data: png, mimeType: 'image/png', fileName: 'a.png' },
					notes: { data: 'eA==', mimeType: 'text/plain' },
				},
			},
		],
		params: {
			model: 'tiny-vision',
			messageMode: 'simple',
			systemPrompt: '',
			userMessage: 'Describe',
			images: 'auto',
			tools: '[]',
			options: { temperature: 0.2 },
		},
		respond: () => HELLO,
	});
	const [out] = await new ModelOrchestratorChat().execute.call(ctx);
	// which node holds the model (GET /models), then the chat to it
	assert.deepEqual(
		ctx.requests.map((r) => [r.method, r.url]),
		[
			['GET', 'http://sidecar:8000/models'],
			['POST', 'http://sidecar:8000/v1/chat/completions'],
		],
	);
	const req = ctx.requests[1];
	// the Timeout (default 600 s) goes to the sidecar's queue; the node waits 5 s longer for its answer
	assert.equal(req.headers['X-Queue-Timeout-S'], '600');
	assert.equal(req.timeout, 605_000);
	assert.equal(req.returnFullResponse, true);
	assert.equal(req.body.temperature, 0.2);
	assert.deepEqual(req.body.messages, [
		{
			role: 'user',
			content: [
				{ type: 'text', text: 'Describe' },
				{ type: 'image_url', image_url: { url: `data:image/png;base64,${png}` } },
			],
		},
	]);
	assert.equal(out.length, 1);
	assert.equal(out[0].json.content, 'Hello from a tiny model!');
	assert.equal(out[0].json.finish_reason, 'stop');
	assert.equal(out[0].json.images_sent, 1);
	assert.deepEqual(out[0].json.usage, HELLO.usage);
	assert.deepEqual(out[0].pairedItem, { item: 0 });
	// where it ran and how long it waited in the sidecar's queue (X-Queue-Wait-Ms)
	assert.equal(out[0].json.node, 'gpu-a');
	assert.equal(out[0].json.queue_wait_s, 1.5);
});

const notFound = () => {
	const e = new Error('Request failed with status code 404');
	e.response = {
		status: 404,
		data: {
			error: {
				code: 'model_not_found',
				message: "unknown model 'nope'",
				type: 'invalid_request_error',
			},
		},
	};
	throw e;
};

test('Chat: a sidecar error is a NodeApiError with the sidecar message and its node', async () => {
	const ctx = fakeContext({
		items: [{ json: {} }],
		params: {
			model: 'tiny',
			messageMode: 'simple',
			userMessage: 'Hi',
			images: 'auto',
			tools: '',
			options: {},
		},
		respond: notFound,
	});
	await assert.rejects(new ModelOrchestratorChat().execute.call(ctx), (e) => {
		assert.ok(e instanceof NodeApiError);
		assert.equal(e.message, "gpu-a: unknown model 'nope'");
		assert.equal(e.httpCode, '404');
		assert.match(e.description, /code: model_not_found, HTTP 404, node: gpu-a \(http:\/\/sidecar:8000\)/);
		return true;
	});
	// a model no sidecar has in its registry: refused before any chat request, naming what each node has
	const unknown = fakeContext({
		items: [{ json: {} }],
		params: { model: 'nope', messageMode: 'simple', userMessage: 'Hi', images: 'auto', options: {} },
		respond: () => assert.fail('no chat request expected'),
	});
	await assert.rejects(new ModelOrchestratorChat().execute.call(unknown), (e) => {
		assert.ok(e instanceof NodeApiError);
		assert.match(e.message, /^unknown model 'nope': no sidecar has it in its registry \(gpu-a: not in its registry/);
		assert.equal(e.httpCode, '404');
		return true;
	});
});

test('Chat: continue on fail gives an error item per failed item and goes on', async () => {
	const ctx = fakeContext({
		items: [{ json: {} }, { json: {} }],
		params: (name, i) =>
			({
				model: i === 0 ? 'nope' : 'tiny',
				messageMode: 'simple',
				userMessage: 'Hi',
				images: 'auto',
				tools: '',
				options: {},
			})[name],
		respond: () => HELLO,
		continueOnFail: true,
	});
	const [out] = await new ModelOrchestratorChat().execute.call(ctx);
	assert.equal(out.length, 2);
	assert.match(out[0].json.error, /^unknown model 'nope'/);
	assert.equal(out[0].json.code, 'model_not_found');
	assert.equal(out[0].json.node, null); // no node has it: the fleet as a whole refused
	assert.equal(out[1].json.content, 'Hello from a tiny model!');
	assert.equal(out[1].json.node, 'gpu-a');
});

test('Chat: invalid tools JSON is a NodeOperationError before any request', async () => {
	const ctx = fakeContext({
		items: [{ json: {} }],
		params: {
			model: 'tiny',
			messageMode: 'simple',
			userMessage: 'Hi',
			images: 'none',
			tools: '[{',
			options: {},
		},
		respond: () => HELLO,
	});
	await assert.rejects(
		new ModelOrchestratorChat().execute.call(ctx),
		(e) => e instanceof NodeOperationError && /Tools is not valid JSON/.test(e.message),
	);
	assert.equal(ctx.requests.length, 0);
});

test('Check VRAM: two outputs; CPU mode treated as configured, with gpu: false in the output', async () => {
	const status = {
		mode: 'cpu',
		total_mb: null,
		used_mb: null,
		free_mb: null,
		loaded_models: {},
		gpus: [],
	};
	for (const [whenNoGpu, enoughCount] of [
		['enough', 1],
		['notEnough', 0],
	]) {
		const ctx = fakeContext({
			items: [{ json: {} }],
			params: { check: 'requiredMb', requiredMb: 18000, whenNoGpu },
			respond: () => status,
		});
		const outputs = await new ModelOrchestratorCheckVram().execute.call(ctx);
		assert.equal(outputs.length, 2);
		assert.equal(outputs[0].length, enoughCount);
		assert.equal(outputs[1].length, 1 - enoughCount);
		const item = (outputs[0][0] ?? outputs[1][0]).json;
		assert.equal(item.vram_check.gpu, false);
		assert.equal(item.mode, 'cpu');
	}
	const gpu = { ...status, mode: 'gpu', free_mb: 12000 };
	const ctx = fakeContext({
		items: [{ json: {} }],
		params: { check: 'requiredMb', requiredMb: 18000, whenNoGpu: 'enough' },
		respond: () => gpu,
	});
	const [enough, notEnough] = await new ModelOrchestratorCheckVram().execute.call(ctx);
	assert.deepEqual([enough.length, notEnough.length], [0, 1]);
	const only = await new ModelOrchestratorCheckVram().execute.call(
		fakeContext({ items: [{ json: {} }], params: { check: 'none' }, respond: () => gpu }),
	);
	assert.equal(only.length, 1);
	assert.equal(only[0][0].json.free_mb, 12000);
});

test("Check VRAM: enough for a model follows the sidecar's fit verdict from POST /models/estimate", async () => {
	const status = { mode: 'gpu', free_mb: 90000, loaded_models: {} };
	const models = [{ id: 'qwen3-vl-30b', aliases: ['qwen3-vl'], status: 'unloaded' }];
	const answer = (fit) => ({
		model: 'qwen3-vl-30b',
		context_size: 8192,
		cache_type: 'f16',
		estimate: { total_mb: 19500.4 },
		fit: { gpu: 0, evict: [], missing_mb: 0, evictable: [], reason: 'r', ...fit },
	});
	const run = async (fit, params = {}) => {
		const ctx = fakeContext({
			items: [{ json: {} }],
			params: { check: 'model', model: 'qwen3-vl', ...params },
			models,
			respond: (o) => (o.url.endsWith('/models/estimate') ? answer(fit) : status),
		});
		const outputs = await new ModelOrchestratorCheckVram().execute.call(ctx);
		return { ctx, outputs };
	};
	const { ctx, outputs } = await run({ fits: true, fits_after_eviction: true });
	assert.deepEqual(
		ctx.requests.map((r) => r.url),
		[
			'http://sidecar:8000/models/status',
			'http://sidecar:8000/models',
			'http://sidecar:8000/models/estimate',
			'http://sidecar:8000/models/status',
		],
	);
	assert.deepEqual(ctx.requests[2].body, { model: 'qwen3-vl-30b' }); // the alias's id, from GET /models
	assert.equal(outputs[0][0].json.vram_check.required_mb, 19501);
	assert.equal(outputs[0][0].json.vram_check.node, 'gpu-a');
	// 90 GB free, but the sidecar says it does not fit (reservations, margin...): Not Enough
	const refused = await run({ fits: false, fits_after_eviction: false, missing_mb: 1200 });
	assert.deepEqual([refused.outputs[0].length, refused.outputs[1].length], [0, 1]);
	assert.equal(refused.outputs[1][0].json.vram_check.fit.missing_mb, 1200);
	// fits after evicting: Not Enough by default, Enough when asked
	const evicting = { fits: false, fits_after_eviction: true, evict: ['small'] };
	assert.equal((await run(evicting)).outputs[1].length, 1);
	assert.equal((await run(evicting, { whenEviction: 'enough' })).outputs[0].length, 1);
});

test('Check VRAM: a model loaded under an alias is enough without an estimate', async () => {
	const ctx = fakeContext({
		items: [{ json: {} }],
		params: { check: 'model', model: 'qwen3-vl' },
		models: [{ id: 'qwen3-vl-30b', aliases: ['qwen3-vl'], status: 'loaded' }],
		respond: () => ({
			node: 'gpu-a',
			mode: 'gpu',
			free_mb: 10,
			loaded_models: { 'qwen3-vl-30b': { status: 'loaded' } },
		}),
	});
	const [enough, notEnough] = await new ModelOrchestratorCheckVram().execute.call(ctx);
	assert.deepEqual([enough.length, notEnough.length], [1, 0]);
	assert.equal(enough[0].json.vram_check.model, 'qwen3-vl-30b');
	assert.match(enough[0].json.vram_check.reason, /already loaded/);
	assert.deepEqual([enough[0].json.vram_check.free_mb, enough[0].json.vram_check.gpu], [10, true]);
	assert.ok(!ctx.requests.some((r) => r.url.endsWith('/models/estimate')));
});

test('Check VRAM: continue on fail sends a failed item to Not Enough, never to Enough', async () => {
	const ctx = fakeContext({
		items: [{ json: {} }, { json: {} }],
		params: { check: 'requiredMb', requiredMb: 10, whenNoGpu: 'enough' },
		continueOnFail: true,
		respond: () => {
			if (ctx.requests.length === 1) {
				const e = new Error('401');
				e.response = {
					status: 401,
					data: { error: { code: 'unauthorized', message: 'missing or wrong API key', type: 'x' } },
				};
				throw e;
			}
			return { mode: 'gpu', free_mb: 100 };
		},
	});
	const [enough, notEnough] = await new ModelOrchestratorCheckVram().execute.call(ctx);
	assert.deepEqual(
		notEnough.map((o) => [o.json.code, o.pairedItem.item]),
		[['unauthorized', 0]],
	);
	assert.deepEqual(
		enough.map((o) => o.pairedItem.item),
		[1],
	);
});

test('Unload Model: resource locator or old plain string; not_loaded and not_held are results, not errors', async () => {
	for (const model of [{ __rl: true, mode: 'id', value: 'wan2.1-14b' }, 'wan2.1-14b']) {
		const ctx = fakeContext({
			items: [{ json: {} }],
			params: (name) =>
				({
					model: typeof model === 'object' ? model.value : model,
					force: false,
					drainTimeoutS: 5,
				})[name],
			respond: () => ({ model: 'wan2.1-14b', status: 'unloaded', result: 'not_held' }),
		});
		const [out] = await new ModelOrchestratorUnloadModel().execute.call(ctx);
		// not in the registry (GET /models): another service's name, asked of every node
		assert.equal(ctx.requests[0].url, 'http://sidecar:8000/models');
		assert.deepEqual(ctx.requests[1].body, {
			model: 'wan2.1-14b',
			force: false,
			drain_timeout_s: 5,
		});
		assert.equal(ctx.requests[1].timeout, 65_000);
		assert.equal(out[0].json.result, 'not_held');
		assert.equal(out[0].json.node, 'gpu-a');
	}
	assert.deepEqual(buildUnloadBody({ __rl: true, mode: 'list', value: 'tiny' }, true, 30), {
		model: 'tiny',
		force: true,
	});
	assert.deepEqual(buildUnloadBody('tiny', false, 30), {
		model: 'tiny',
		force: false,
		drain_timeout_s: 30,
	});
	// an empty name fails before any request
	const empty = fakeContext({
		items: [{ json: {} }],
		params: { model: '', force: true },
		respond: () => assert.fail('no request expected'),
	});
	await assert.rejects(
		new ModelOrchestratorUnloadModel().execute.call(empty),
		(e) => e instanceof NodeOperationError && /Choose the model/.test(e.message),
	);
});

test('Load Model: Wait Until Ready posts wait=false with a short HTTP timeout, then polls the status', async () => {
	const statuses = [
		{ loaded_models: { tiny: { model: 'tiny', status: 'loading' } } },
		{
			loaded_models: {
				tiny: {
					model: 'tiny',
					status: 'loaded',
					load_seconds: 1.5,
					pid: 42,
					port: 9001,
					gpu: 0,
					estimate_mb: 900,
				},
			},
		},
	];
	const ctx = fakeContext({
		items: [{ json: {} }],
		params: {
			model: 'tiny',
			wait: true,
			timeoutS: 120,
			options: {
				priority: 10,
				allowEviction: true,
				callbackUrl: 'http://n8n/hook',
				pollIntervalS: 0.01,
			},
		},
		models: [{ id: 'tiny', status: 'loading' }],
		respond: (o) =>
			o.url.endsWith('/models/load')
				? { model: 'tiny', status: 'loading', result: 'loading', evicted: ['other'] }
				: statuses.shift(),
	});
	const [out] = await new ModelOrchestratorLoadModel().execute.call(ctx);
	assert.equal(ctx.requests[0].url, 'http://sidecar:8000/models'); // where is it? (loading on gpu-a: join it)
	assert.deepEqual(ctx.requests[1].body, {
		model: 'tiny',
		service: 'llama-cpp',
		wait: false,
		timeout_s: 120,
		priority: 10,
		allow_eviction: true,
	});
	assert.equal(ctx.requests[1].timeout, 60_000);
	assert.deepEqual(
		ctx.requests.slice(2).map((r) => [r.method, r.url, r.timeout]),
		[
			['GET', 'http://sidecar:8000/models/status', 15_000],
			['GET', 'http://sidecar:8000/models/status', 15_000],
		],
	);
	assert.deepEqual(out[0].json, {
		model: 'tiny',
		status: 'loaded',
		result: 'loaded',
		load_seconds: 1.5,
		pid: 42,
		port: 9001,
		gpu: 0,
		estimate_mb: 900,
		evicted: ['other'],
		node: 'gpu-a',
		placement: 'tiny is loading on gpu-a',
	});
});

test('Load Model: Wait Until Ready off is one POST whose 202 answer (with download) is the output', async () => {
	const answer = {
		model: 'tiny',
		status: 'downloading',
		result: 'downloading',
		download: { bytes_done: 0, bytes_total: 10, files: [] },
	};
	const ctx = fakeContext({
		items: [{ json: {} }],
		params: { model: 'tiny', wait: false, timeoutS: 60, options: { callbackUrl: 'http://n8n/hook' } },
		models: [{ id: 'tiny', status: 'downloading' }],
		respond: () => answer,
	});
	const [out] = await new ModelOrchestratorLoadModel().execute.call(ctx);
	assert.equal(ctx.requests.length, 2); // GET /models, then the one POST
	assert.equal(ctx.requests[1].body.wait, false);
	assert.equal(ctx.requests[1].body.callback_url, 'http://n8n/hook');
	assert.deepEqual(out[0].json, { ...answer, node: 'gpu-a', placement: 'tiny is downloading on gpu-a' });
});

const dl = (done, total, seconds, resumed = 0) => ({
	bytes_done: done,
	bytes_total: total,
	percent: Math.round((1000 * done) / total) / 10,
	bytes_per_second: Math.round((done - resumed) / seconds),
	seconds,
	eta_s: 1,
	started_at: '2026-11-26T09:00:00+00:00',
	files: [{ file: 'tiny.gguf', bytes_done: done, bytes_total: total, resumed_from: resumed }],
});

/** A Load Model run against a sidecar whose POST answers `post` and whose status answers come from `statuses`
 * (the last one repeats); `models` answers GET /models. */
function loadRun({ post, statuses, models, options = {}, continueOnFail = false }) {
	const seq = [...statuses];
	// the fleet's first look (GET /models) finds the model where the POST's answer says it is (held: no estimate)
	const held = typeof post === 'function' ? 'downloading' : post.status;
	let looks = 0;
	return fakeContext({
		items: [{ json: {} }],
		continueOnFail,
		models: () => (looks++ === 0 ? [{ id: 'tiny', status: held }] : models.models),
		params: {
			model: 'tiny',
			wait: true,
			timeoutS: 60,
			options: { pollIntervalS: 0.01, ...options },
		},
		respond: (o) => {
			if (o.url.endsWith('/models/load')) return typeof post === 'function' ? post() : post;
			return seq.length > 1 ? seq.shift() : seq[0];
		},
	});
}

const entry = (status, extra = {}) => ({ loaded_models: { tiny: { model: 'tiny', status, ...extra } } });

test('Load Model: a download (growing bytes) then loading then loaded: output with a download summary', async () => {
	const ctx = loadRun({
		post: {
			model: 'tiny',
			status: 'downloading',
			result: 'downloading',
			download: dl(0, 1000, 0, 200),
			evicted: [],
		},
		statuses: [
			entry('downloading', { download: dl(400, 1000, 1, 200) }),
			entry('downloading', { download: dl(700, 1000, 2, 200) }),
			entry('downloading', { download: dl(1000, 1000, 3, 200) }),
			entry('loading'),
			entry('loaded', { load_seconds: 0.8, pid: 7, port: 9002, gpu: 1, estimate_mb: 512 }),
		],
	});
	const [out] = await new ModelOrchestratorLoadModel().execute.call(ctx);
	assert.deepEqual(out[0].json, {
		model: 'tiny',
		status: 'loaded',
		result: 'loaded',
		load_seconds: 0.8,
		pid: 7,
		port: 9002,
		gpu: 1,
		estimate_mb: 512,
		evicted: [],
		download: {
			bytes_total: 1000,
			seconds: 3,
			bytes_per_second: 267,
			files: [{ file: 'tiny.gguf', bytes_total: 1000, resumed_from: 200 }],
			resumed_from: 200,
		},
		node: 'gpu-a',
		placement: 'tiny is downloading on gpu-a',
	});
});

test('Load Model: the download ended and its load is not admitted yet (unloaded, files present): asks again and joins', async () => {
	let posts = 0;
	const ctx = loadRun({
		post: () =>
			++posts === 1
				? { model: 'tiny', status: 'downloading', result: 'downloading', download: dl(0, 10, 0) }
				: { model: 'tiny', status: 'loading', result: 'loading', evicted: ['big'] },
		statuses: [
			entry('downloading', { download: dl(10, 10, 1) }),
			{ loaded_models: {} },
			entry('loaded', { load_seconds: 1, pid: 1, port: 2, gpu: 0, estimate_mb: 3 }),
		],
		models: { default_model: 'tiny', models: [{ id: 'tiny', status: 'unloaded', files_present: true }] },
	});
	const [out] = await new ModelOrchestratorLoadModel().execute.call(ctx);
	assert.equal(posts, 2);
	assert.equal(out[0].json.result, 'loaded');
	assert.deepEqual(out[0].json.evicted, ['big']);
	assert.equal(out[0].json.download.bytes_total, 10);
});

test('Load Model: a failed download is a NodeApiError with the model error code and message', async () => {
	const error = { code: 'hub_unreachable', message: 'the Hub did not answer', at: 'now' };
	const ctx = loadRun({
		post: { model: 'tiny', status: 'downloading', result: 'downloading', download: dl(0, 10, 0) },
		statuses: [entry('downloading', { download: dl(5, 10, 1) }), entry('failed', { error })],
	});
	await assert.rejects(new ModelOrchestratorLoadModel().execute.call(ctx), (e) => {
		assert.ok(e instanceof NodeApiError);
		assert.equal(e.message, 'gpu-a: the Hub did not answer');
		assert.equal(e.description, 'code: hub_unreachable, node: gpu-a');
		return true;
	});
	// continue on fail: the error item carries the code
	const ctx2 = loadRun({
		post: { model: 'tiny', status: 'loading', result: 'loading' },
		statuses: [entry('failed', { error: { code: 'load_failed', message: 'llama-server exited' } })],
		continueOnFail: true,
	});
	const [out] = await new ModelOrchestratorLoadModel().execute.call(ctx2);
	assert.deepEqual(out[0].json, { error: 'gpu-a: llama-server exited', code: 'load_failed', node: 'gpu-a' });
});

test('Load Model: a model that disappears (an unload cancelled the download) is a cancelled error', async () => {
	const ctx = loadRun({
		post: { model: 'tiny', status: 'downloading', result: 'downloading', download: dl(0, 10, 0) },
		statuses: [entry('downloading', { download: dl(5, 10, 1) }), { loaded_models: {} }],
		models: { default_model: 'tiny', models: [{ id: 'tiny', status: 'unloaded', files_present: false }] },
	});
	await assert.rejects(new ModelOrchestratorLoadModel().execute.call(ctx), (e) => {
		assert.ok(e instanceof NodeApiError);
		assert.match(e.message, /the load of tiny was cancelled \(an unload stopped it\)/i);
		assert.equal(e.description, 'code: load_cancelled, node: gpu-a');
		return true;
	});
	assert.equal(ctx.requests.filter((r) => r.url.endsWith('/models/load')).length, 1);
	// during llama-server's start: cancelled at once, no second look
	const ctx2 = loadRun({
		post: { model: 'tiny', status: 'loading', result: 'loading' },
		statuses: [entry('loading'), { loaded_models: {} }],
	});
	await assert.rejects(new ModelOrchestratorLoadModel().execute.call(ctx2), /cancelled/);
});

test('Load Model: a download with no new bytes for the stall timeout fails with download_stalled', async () => {
	const ctx = loadRun({
		post: { model: 'tiny', status: 'downloading', result: 'downloading', download: dl(0, 10, 0) },
		statuses: [
			entry('downloading', { download: dl(3, 10, 1) }),
			entry('downloading', { download: dl(3, 10, 2) }),
		],
		options: { stallTimeoutS: 0.1 },
	});
	const t0 = Date.now();
	await assert.rejects(new ModelOrchestratorLoadModel().execute.call(ctx), (e) => {
		assert.ok(e instanceof NodeApiError);
		assert.match(e.message, /stalled: no new bytes for 0\.1 s \(3 of 10 bytes\)/);
		assert.equal(e.description, 'code: download_stalled, node: gpu-a');
		return true;
	});
	assert.ok(Date.now() - t0 >= 100);
});

test('Load Model: already loaded is one POST, no polling, result already_loaded', async () => {
	const ctx = loadRun({
		post: {
			model: 'tiny',
			status: 'loaded',
			result: 'already_loaded',
			load_seconds: 2,
			pid: 5,
			port: 9003,
			gpu: 0,
			estimate_mb: 100,
			evicted: [],
			download: null,
		},
		statuses: [],
	});
	const [out] = await new ModelOrchestratorLoadModel().execute.call(ctx);
	assert.equal(ctx.requests.length, 2); // GET /models (loaded on gpu-a), the POST there
	assert.deepEqual(out[0].json, {
		model: 'tiny',
		status: 'loaded',
		result: 'already_loaded',
		load_seconds: 2,
		pid: 5,
		port: 9003,
		gpu: 0,
		estimate_mb: 100,
		evicted: [],
		node: 'gpu-a',
		placement: 'tiny is loaded on gpu-a',
	});
});

test('Load Model: a load (joined) that outlasts Timeout plus the margin fails with load_timeout', async () => {
	const realNow = Date.now;
	let clock = realNow();
	Date.now = () => (clock += 20_000); // every look at the clock: 20 s later
	try {
		const ctx = loadRun({
			post: { model: 'tiny', status: 'loading', result: 'loading' },
			statuses: [entry('loading')],
		});
		await assert.rejects(new ModelOrchestratorLoadModel().execute.call(ctx), (e) => {
			assert.equal(e.description, 'code: load_timeout, node: gpu-a');
			assert.match(e.message, /not ready 90 s after its start \(Timeout 60 s plus a 30 s margin\)/);
			return true;
		});
	} finally {
		Date.now = realNow;
	}
});

test('Chat: the LoRA Adapters collection goes out as the request lora field', async () => {
	const ctx = fakeContext({
		items: [{ json: {} }],
		params: {
			model: 'tiny-lora',
			messageMode: 'simple',
			systemPrompt: '',
			userMessage: 'Hi',
			images: 'none',
			tools: '[]',
			options: {},
			loraAdapters: { adapter: [{ name: 'terse', scale: 1 }] },
		},
		respond: () => ({ ...HELLO, model: 'tiny-lora' }),
	});
	await new ModelOrchestratorChat().execute.call(ctx);
	assert.deepEqual(ctx.requests[1].body.lora, [{ name: 'terse', scale: 1 }]);
	// a bad scale is a NodeOperationError before any request
	const bad = fakeContext({
		items: [{ json: {} }],
		params: {
			model: 'tiny-lora',
			messageMode: 'simple',
			userMessage: 'Hi',
			images: 'none',
			loraAdapters: { adapter: [{ name: 'terse', scale: 12 }] },
		},
		respond: () => HELLO,
	});
	await assert.rejects(new ModelOrchestratorChat().execute.call(bad), NodeOperationError);
	assert.equal(bad.requests.length, 0);
});
