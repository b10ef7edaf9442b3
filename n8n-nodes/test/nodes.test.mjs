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
const { NodeApiError, NodeOperationError } = require('n8n-workflow');

function fakeContext({ items, params, respond, continueOnFail = false, credentials }) {
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
		getNodeParameter: (name, i, fallback) => {
			const v = typeof params === 'function' ? params(name, i) : params[name];
			return v === undefined ? fallback : v;
		},
		getCredentials: async () => credentials ?? { baseUrl: 'http://sidecar:8000/', apiKey: '' },
		continueOnFail: () => continueOnFail,
		helpers: {
			httpRequestWithAuthentication: async function (credentialType, options) {
				assert.equal(credentialType, 'modelOrchestratorApi');
				requests.push(options);
				return respond(options);
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
	assert.equal(ctx.requests.length, 1);
	const req = ctx.requests[0];
	assert.equal(req.url, 'http://sidecar:8000/v1/chat/completions');
	assert.equal(req.method, 'POST');
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

test('Chat: a sidecar error is a NodeApiError with the sidecar message', async () => {
	const ctx = fakeContext({
		items: [{ json: {} }],
		params: {
			model: 'nope',
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
		assert.equal(e.message, "unknown model 'nope'");
		assert.equal(e.httpCode, '404');
		return true;
	});
});

test('Chat: continue on fail gives an error item per failed item and goes on', async () => {
	let n = 0;
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
		respond: () => (n++ === 0 ? notFound() : HELLO),
		continueOnFail: true,
	});
	const [out] = await new ModelOrchestratorChat().execute.call(ctx);
	assert.equal(out.length, 2);
	assert.equal(out[0].json.error, "unknown model 'nope'");
	assert.equal(out[0].json.code, 'model_not_found');
	assert.equal(out[1].json.content, 'Hello from a tiny model!');
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

test('Check VRAM: enough for a model uses POST /models/estimate; a sidecar without it gets a clear error', async () => {
	const status = { mode: 'gpu', free_mb: 20000, loaded_models: {} };
	const ctx = fakeContext({
		items: [{ json: {} }],
		params: { check: 'model', model: 'qwen3-vl-30b', whenNoGpu: 'enough' },
		respond: (o) =>
			o.url.endsWith('/models/estimate') ? { model: 'qwen3-vl-30b', total_mb: 19500.4 } : status,
	});
	const [enough] = await new ModelOrchestratorCheckVram().execute.call(ctx);
	assert.equal(ctx.requests[1].url, 'http://sidecar:8000/models/estimate');
	assert.deepEqual(ctx.requests[1].body, { model: 'qwen3-vl-30b' });
	assert.equal(enough[0].json.vram_check.required_mb, 19501);
	// the sidecar's answer shape: {model, estimate: {total_mb, ...}, fit: {...}}
	const nested = fakeContext({
		items: [{ json: {} }],
		params: { check: 'model', model: 'qwen3-vl-30b', whenNoGpu: 'enough' },
		respond: (o) =>
			o.url.endsWith('/models/estimate')
				? { model: 'qwen3-vl-30b', estimate: { total_mb: 21000 }, fit: { fits: false } }
				: status,
	});
	const [yes, no] = await new ModelOrchestratorCheckVram().execute.call(nested);
	assert.deepEqual([yes.length, no.length], [0, 1]);
	assert.equal(no[0].json.vram_check.required_mb, 21000);
	assert.deepEqual(no[0].json.vram_check.estimate.fit, { fits: false });
	const old = fakeContext({
		items: [{ json: {} }],
		params: { check: 'model', model: 'qwen3-vl-30b', whenNoGpu: 'enough' },
		respond: (o) => {
			if (!o.url.endsWith('/models/estimate')) return status;
			const e = new Error('404');
			e.response = {
				status: 404,
				data: { error: { code: 'not_found', message: 'Not Found', type: 'invalid_request_error' } },
			};
			throw e;
		},
	});
	await assert.rejects(new ModelOrchestratorCheckVram().execute.call(old), /too old/);
});

test('Load Model: body and a wait-long-enough HTTP timeout', async () => {
	const ctx = fakeContext({
		items: [{ json: {} }],
		params: {
			model: 'tiny',
			wait: true,
			timeoutS: 120,
			options: { priority: 10, allowEviction: true },
		},
		respond: () => ({ model: 'tiny', status: 'loaded', result: 'loaded' }),
	});
	const [out] = await new ModelOrchestratorLoadModel().execute.call(ctx);
	assert.deepEqual(ctx.requests[0].body, {
		model: 'tiny',
		service: 'llama-cpp',
		wait: true,
		timeout_s: 120,
		priority: 10,
		allow_eviction: true,
	});
	assert.equal(ctx.requests[0].timeout, 150_000);
	assert.equal(out[0].json.result, 'loaded');
});
