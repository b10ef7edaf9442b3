// Unit tests of the request building: run with `node --test "test/*.test.mjs"` after `n8n-node build` (they load dist/).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const chat = require('../dist/nodes/shared/chat.js');
const transport = require('../dist/nodes/shared/transport.js');
const vram = require('../dist/nodes/shared/vram.js');
const modelField = require('../dist/nodes/shared/model-field.js');
const {
	buildLoadBody,
} = require('../dist/nodes/ModelOrchestratorLoadModel/ModelOrchestratorLoadModel.node.js');
const { NodeApiError } = require('n8n-workflow');

const PNG = Buffer.from('89504e470d0a1a0a0000000d49484452', 'hex');

test('binary -> data URL', () => {
	assert.equal(chat.toDataUrl('image/png', PNG), `data:image/png;base64,${PNG.toString('base64')}`);
	assert.equal(chat.toDataUrl('image/jpeg', 'QUJD'), 'data:image/jpeg;base64,QUJD');
	// an already prefixed string is not prefixed twice
	assert.equal(
		chat.toDataUrl('image/png', 'data:image/png;base64,QUJD'),
		'data:image/png;base64,QUJD',
	);
});

test('simple mode: system prompt, user message, images on the user message', () => {
	const body = chat.buildChatBody({
		model: 'tiny-vision',
		messageMode: 'simple',
		systemPrompt: 'Be brief.',
		userMessage: 'Describe the image',
		images: [{ mimeType: 'image/png', base64: PNG.toString('base64') }],
	});
	assert.equal(body.model, 'tiny-vision');
	assert.equal(body.stream, false);
	assert.deepEqual(body.messages[0], { role: 'system', content: 'Be brief.' });
	assert.deepEqual(body.messages[1], {
		role: 'user',
		content: [
			{ type: 'text', text: 'Describe the image' },
			{ type: 'image_url', image_url: { url: `data:image/png;base64,${PNG.toString('base64')}` } },
		],
	});
	assert.equal(body.tools, undefined);
	assert.equal(body.tool_choice, undefined);
});

test('simple mode without system prompt or images keeps content a string', () => {
	const body = chat.buildChatBody({ model: 'tiny', messageMode: 'simple', userMessage: 'Hi' });
	assert.deepEqual(body.messages, [{ role: 'user', content: 'Hi' }]);
	assert.throws(
		() => chat.buildChatBody({ model: 'tiny', messageMode: 'simple', userMessage: '' }),
		/user message is empty/,
	);
	assert.throws(
		() => chat.buildChatBody({ model: '', messageMode: 'simple', userMessage: 'x' }),
		/model/,
	);
});

test('messages mode: JSON string or array; images go on the last user message', () => {
	const messages = [
		{ role: 'system', content: 's' },
		{ role: 'user', content: 'first' },
		{ role: 'assistant', content: 'a' },
		{ role: 'user', content: [{ type: 'text', text: 'second' }] },
	];
	const body = chat.buildChatBody({
		model: 'm',
		messageMode: 'messages',
		messages: JSON.stringify(messages),
		images: [{ mimeType: 'image/jpeg', base64: 'QUJD' }],
	});
	assert.equal(body.messages.length, 4);
	assert.equal(body.messages[1].content, 'first');
	assert.deepEqual(body.messages[3].content, [
		{ type: 'text', text: 'second' },
		{ type: 'image_url', image_url: { url: 'data:image/jpeg;base64,QUJD' } },
	]);
	// the caller's array is not modified
	assert.deepEqual(messages[3].content, [{ type: 'text', text: 'second' }]);
	// no user message: the images get one of their own
	const b2 = chat.buildChatBody({
		model: 'm',
		messageMode: 'messages',
		messages: [{ role: 'system', content: 's' }],
		images: [{ mimeType: 'image/png', base64: 'QUJD' }],
	});
	assert.equal(b2.messages[1].role, 'user');
	assert.equal(b2.messages[1].content[0].type, 'image_url');
	assert.throws(
		() => chat.buildChatBody({ model: 'm', messageMode: 'messages', messages: '[' }),
		/Messages is not valid JSON/,
	);
	assert.throws(
		() => chat.buildChatBody({ model: 'm', messageMode: 'messages', messages: '[]' }),
		/non-empty/,
	);
	assert.throws(
		() =>
			chat.buildChatBody({ model: 'm', messageMode: 'messages', messages: '[{"content": "x"}]' }),
		/role/,
	);
});

const WEATHER = {
	type: 'function',
	function: {
		name: 'get_weather',
		description: 'Weather for a city',
		parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
	},
};

test('tools as JSON with tool_choice', () => {
	const body = chat.buildChatBody({
		model: 'tiny-tools',
		messageMode: 'simple',
		userMessage: 'Weather in Paris?',
		tools: JSON.stringify([WEATHER]),
	});
	assert.deepEqual(body.tools, [WEATHER]);
	assert.equal(body.tool_choice, 'auto');
	// a bare function definition is wrapped; a specific function choice
	const b2 = chat.buildChatBody({
		model: 'm',
		messageMode: 'simple',
		userMessage: 'x',
		tools: [WEATHER.function],
		toolChoice: 'function',
		toolChoiceFunction: 'get_weather',
	});
	assert.deepEqual(b2.tools, [WEATHER]);
	assert.deepEqual(b2.tool_choice, { type: 'function', function: { name: 'get_weather' } });
	const b3 = chat.buildChatBody({
		model: 'm',
		messageMode: 'simple',
		userMessage: 'x',
		tools: '[]',
		toolChoice: 'required',
	});
	assert.equal(b3.tools, undefined);
	assert.equal(b3.tool_choice, undefined);
	assert.throws(
		() =>
			chat.buildChatBody({
				model: 'm',
				messageMode: 'simple',
				userMessage: 'x',
				tools: '[{"type": "function"',
			}),
		(e) => e instanceof chat.ChatParameterError && /Tools is not valid JSON/.test(e.message),
	);
	assert.throws(
		() =>
			chat.buildChatBody({
				model: 'm',
				messageMode: 'simple',
				userMessage: 'x',
				tools: '[{"type": "function", "function": {}}]',
			}),
		/name is missing/,
	);
	assert.throws(
		() =>
			chat.buildChatBody({
				model: 'm',
				messageMode: 'simple',
				userMessage: 'x',
				tools: [WEATHER],
				toolChoice: 'function',
			}),
		/Name the function/,
	);
});

test('sampling options and JSON response format', () => {
	const body = chat.buildChatBody({
		model: 'm',
		messageMode: 'simple',
		userMessage: 'x',
		options: {
			temperature: 0.3,
			maxTokens: 64,
			topP: 0.9,
			frequencyPenalty: 0.5,
			presencePenalty: -0.5,
			responseFormat: 'json_object',
			seed: 7,
			stop: 'END, ###',
		},
	});
	assert.equal(body.temperature, 0.3);
	assert.equal(body.max_tokens, 64);
	assert.equal(body.top_p, 0.9);
	assert.equal(body.frequency_penalty, 0.5);
	assert.equal(body.presence_penalty, -0.5);
	assert.deepEqual(body.response_format, { type: 'json_object' });
	assert.equal(body.seed, 7);
	assert.deepEqual(body.stop, ['END', '###']);
	const plain = chat.buildChatBody({
		model: 'm',
		messageMode: 'simple',
		userMessage: 'x',
		options: { responseFormat: 'text' },
	});
	assert.equal(plain.response_format, undefined);
	assert.equal(plain.temperature, undefined);
});

test('response parsing: content, tool calls with parsed arguments, usage, finish_reason', () => {
	const out = chat.parseChatResponse({
		id: 'c1',
		model: 'tiny-tools',
		choices: [
			{
				finish_reason: 'tool_calls',
				message: {
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
			},
		],
		usage: { prompt_tokens: 10, completion_tokens: 5, total_tokens: 15 },
	});
	assert.equal(out.content, null);
	assert.deepEqual(out.tool_calls, [
		{ id: 't1', type: 'function', name: 'get_weather', arguments: { city: 'Paris' } },
	]);
	assert.equal(out.finish_reason, 'tool_calls');
	assert.deepEqual(out.usage, { prompt_tokens: 10, completion_tokens: 5, total_tokens: 15 });
	const text = chat.parseChatResponse({
		choices: [{ finish_reason: 'stop', message: { content: 'Hello' } }],
	});
	assert.equal(text.content, 'Hello');
	assert.deepEqual(text.tool_calls, []);
	assert.throws(() => chat.parseChatResponse({ choices: [] }), /without choices/);
});

test('image property selection from binary data', () => {
	const binary = {
		data: { mimeType: 'image/png' },
		doc: { mimeType: 'application/pdf' },
		photo: { mimeType: 'image/jpeg' },
	};
	assert.deepEqual(chat.selectImageProperties(binary, 'auto', ''), ['data', 'photo']);
	assert.deepEqual(chat.selectImageProperties(binary, 'none', ''), []);
	assert.deepEqual(chat.selectImageProperties(undefined, 'auto', ''), []);
	assert.deepEqual(chat.selectImageProperties(binary, 'properties', 'photo, data'), [
		'photo',
		'data',
	]);
	assert.throws(
		() => chat.selectImageProperties(binary, 'properties', 'missing'),
		/no binary property "missing"/,
	);
	assert.throws(
		() => chat.selectImageProperties(undefined, 'properties', 'data'),
		/no binary data/,
	);
});

test('base URL and request options', () => {
	assert.equal(transport.normaliseBaseUrl('http://llama-cpp:8000/'), 'http://llama-cpp:8000');
	assert.equal(transport.normaliseBaseUrl('http://h:1/v1/'), 'http://h:1');
	assert.equal(transport.normaliseBaseUrl('127.0.0.1:8000'), 'http://127.0.0.1:8000');
	assert.throws(() => transport.normaliseBaseUrl(''), /no base URL/);
	const o = transport.buildRequestOptions('http://h:1/', {
		method: 'POST',
		path: '/models/load',
		body: { model: 'x' },
		timeoutMs: 5000,
	});
	assert.equal(o.url, 'http://h:1/models/load');
	assert.equal(o.method, 'POST');
	assert.equal(o.json, true);
	assert.equal(o.timeout, 5000);
	assert.deepEqual(o.body, { model: 'x' });
	const g = transport.buildRequestOptions('http://h:1', { method: 'GET', path: '/models/status' });
	assert.equal(g.body, undefined);
});

test('load body: allow_eviction only when asked, priority, timeout', () => {
	assert.deepEqual(buildLoadBody('m', true, 600, {}), {
		model: 'm',
		service: 'llama-cpp',
		wait: true,
		timeout_s: 600,
	});
	assert.deepEqual(
		buildLoadBody('m', false, 60, { priority: 10, allowEviction: true, service: 'llama-cpp' }),
		{
			model: 'm',
			service: 'llama-cpp',
			wait: false,
			timeout_s: 60,
			priority: 10,
			allow_eviction: true,
		},
	);
});

const node = {
	id: '1',
	name: 'Chat',
	type: 'n8n-nodes-model-orchestrator.modelOrchestratorChat',
	typeVersion: 1,
	position: [0, 0],
	parameters: {},
};

function axiosLikeError(status, data) {
	const e = new Error(`Request failed with status code ${status}`);
	e.isAxiosError = true;
	e.response = { status, data };
	return e;
}

test('errors: the sidecar message is found however the helper wrapped it', () => {
	const body = {
		error: {
			code: 'model_not_found',
			message: "unknown model 'nope'",
			type: 'invalid_request_error',
		},
	};
	const direct = transport.extractSidecarError(axiosLikeError(404, body));
	assert.deepEqual(
		{ code: direct.code, message: direct.message, httpCode: direct.httpCode },
		{ code: 'model_not_found', message: "unknown model 'nope'", httpCode: '404' },
	);
	// n8n's httpRequestWithAuthentication wraps the axios error in a NodeApiError (cause = the axios error)
	const wrapped = new NodeApiError(
		node,
		axiosLikeError(503, {
			error: { code: 'load_timeout', message: 'not ready in 5 s', type: 'server_error' },
		}),
	);
	const w = transport.extractSidecarError(wrapped);
	assert.equal(w.code, 'load_timeout');
	assert.equal(w.message, 'not ready in 5 s');
	assert.equal(w.httpCode, '503');
	// a body that arrived as a string
	const s = transport.extractSidecarError(
		axiosLikeError(
			400,
			JSON.stringify({ error: { code: 'bad_request', message: 'priority: too big', type: 'x' } }),
		),
	);
	assert.equal(s.message, 'priority: too big');
	// no response at all: connection refused
	const refused = Object.assign(new Error('connect ECONNREFUSED 127.0.0.1:9'), {
		code: 'ECONNREFUSED',
	});
	const r = transport.extractSidecarError(refused);
	assert.equal(r.code, 'ECONNREFUSED');
	assert.equal(r.httpCode, undefined);
});

test('errors become NodeApiError carrying the sidecar message', () => {
	const err = transport.toNodeApiError(
		node,
		axiosLikeError(404, {
			error: { code: 'model_not_found', message: "unknown model 'nope'", type: 'x' },
		}),
		2,
	);
	assert.ok(err instanceof NodeApiError);
	assert.equal(err.message, "unknown model 'nope'");
	assert.equal(err.httpCode, '404');
	assert.match(err.description, /model_not_found/);
	assert.equal(err.context.itemIndex, 2);
	const refused = transport.toNodeApiError(
		node,
		Object.assign(new Error('connect ECONNREFUSED 127.0.0.1:9'), { code: 'ECONNREFUSED' }),
	);
	assert.match(refused.message, /ECONNREFUSED|refused the connection/);
	assert.match(refused.description, /Base URL/);
	// n8n's own errors pass through asNodeError unchanged
	assert.equal(transport.asNodeError(node, err), err);
});

test('models -> the one picker: every model of every node, where it is loaded', () => {
	const a = {
		models: [
			{ id: 'qwen3-vl-30b', status: 'loaded', vision: true, default: true, aliases: ['qwen3-vl'] },
			{ id: 'tiny', status: 'unloaded', vision: false, aliases: [] },
		],
	};
	const one = modelField.fleetModelOptions([{ node: 'gpu-a', body: a }]);
	assert.deepEqual(
		one.map((o) => [o.value, o.name, o.description]),
		[
			['qwen3-vl-30b', 'qwen3-vl-30b (loaded, vision)', 'Aliases: qwen3-vl.'],
			['tiny', 'tiny (unloaded)', undefined],
		],
	);
	const b = { models: [{ id: 'tiny', status: 'loaded', aliases: ['t'] }, { id: 'embed', status: 'unloaded' }] };
	const two = modelField.fleetModelOptions([
		{ node: 'gpu-a', body: a },
		{ node: 'gpu-b', body: b },
	]);
	assert.deepEqual(
		two.map((o) => [o.value, o.name, o.description]),
		[
			['embed', 'embed (unloaded)', 'On gpu-b.'],
			['qwen3-vl-30b', 'qwen3-vl-30b (loaded on gpu-a, vision)', 'On gpu-a. Aliases: qwen3-vl.'],
			['tiny', 'tiny (loaded on gpu-b)', 'On gpu-a, gpu-b. Aliases: t.'],
		],
	);
	assert.deepEqual(modelField.fleetModelOptions([{ node: 'x', body: {} }]), []);
});

test('VRAM decision for MB: free_mb against the number, CPU mode (free_mb null) as configured', () => {
	const gpu = { mode: 'gpu', free_mb: 20000, loaded_models: {} };
	assert.equal(vram.decideForMb(gpu, 18000, 'enough').enough, true);
	assert.equal(vram.decideForMb(gpu, 24000, 'enough').enough, false);
	assert.equal(vram.decideForMb(gpu, 24000, 'enough').gpu, true);
	const cpu = { mode: 'cpu', free_mb: null, loaded_models: {}, note: 'no NVML' };
	const asEnough = vram.decideForMb(cpu, 18000, 'enough');
	assert.deepEqual([asEnough.enough, asEnough.gpu, asEnough.free_mb], [true, false, null]);
	assert.match(asEnough.reason, /CPU mode/);
	assert.equal(vram.decideForMb(cpu, 18000, 'notEnough').enough, false);
});

function estimateAnswer(fit) {
	return {
		model: 'qwen3-vl-30b',
		context_size: 8192,
		cache_type: 'f16',
		estimate: { total_mb: 18808.2 },
		fit: { gpu: 0, evict: [], missing_mb: 0, evictable: [], reason: 'fits', ...fit },
	};
}

test("VRAM decision for a model: the sidecar's fit verdict, never free memory", () => {
	// fits now: enough, whatever free_mb says (the sidecar counted margin, reservations, placement)
	const fits = vram.decideForModel(
		estimateAnswer({ fits: true, fits_after_eviction: true }),
		100,
		'notEnough',
	);
	assert.deepEqual(
		[fits.enough, fits.gpu, fits.required_mb, fits.model],
		[true, true, 18809, 'qwen3-vl-30b'],
	);
	assert.equal(fits.fit.reason, 'fits');
	// does not fit, even with lots of free memory reported: not enough, with what is missing
	const refused = estimateAnswer({
		fits: false,
		fits_after_eviction: false,
		missing_mb: 3590,
		evictable: ['dense'],
		reason: 'needs 18809 MB, GPU 0 has 15219 MB available (margin 512 MB included)',
	});
	const no = vram.decideForModel(refused, 90000, 'enough');
	assert.equal(no.enough, false);
	assert.deepEqual(no.fit.evictable, ['dense']);
	assert.match(no.reason, /margin 512 MB/);
	// fits only after evicting: as configured
	const evicting = estimateAnswer({
		fits: false,
		fits_after_eviction: true,
		evict: ['small'],
		reason: 'fits on GPU 0 after evicting small',
	});
	assert.equal(vram.decideForModel(evicting, 0, 'enough').enough, true);
	const strict = vram.decideForModel(evicting, 0, 'notEnough');
	assert.equal(strict.enough, false);
	assert.match(strict.reason, /without evicting small first/);
	// CPU mode: fits is null; the model cap still decides
	const cpu = vram.decideForModel(
		estimateAnswer({
			fits: null,
			fits_after_eviction: true,
			reason: 'CPU mode: no GPU memory to account',
		}),
		null,
		'notEnough',
	);
	assert.deepEqual([cpu.enough, cpu.gpu], [true, false]);
	const capped = vram.decideForModel(
		estimateAnswer({
			fits: null,
			fits_after_eviction: false,
			evictable: ['other'],
			reason: 'at most 1 models may be loaded',
		}),
		null,
		'enough',
	);
	assert.equal(capped.enough, false);
});

test('model lookup by id or alias (GET /models knows the aliases)', () => {
	const models = {
		models: [
			{ id: 'qwen3-vl-30b', aliases: ['qwen3-vl', 'default-vision'], status: 'loaded' },
			{ id: 'tiny', aliases: [], status: 'unloaded' },
			{ id: 'half', aliases: ['h'], status: 'loading' },
		],
	};
	assert.equal(vram.findModel(models, 'qwen3-vl-30b').id, 'qwen3-vl-30b');
	assert.equal(vram.findModel(models, 'qwen3-vl').id, 'qwen3-vl-30b');
	assert.equal(vram.findModel(models, 'default-vision').id, 'qwen3-vl-30b');
	assert.equal(vram.findModel(models, 'h').status, 'loading');
	assert.equal(vram.findModel(models, 'other'), undefined);
	assert.equal(vram.findModel({}, 'tiny'), undefined);
});

test('model parameter: a resource locator value or an older plain string', () => {
	assert.equal(transport.modelName({ __rl: true, mode: 'list', value: 'tiny' }), 'tiny');
	assert.equal(
		transport.modelName({ __rl: true, mode: 'id', value: ' wan2.1-14b ' }),
		'wan2.1-14b',
	);
	assert.equal(transport.modelName('qwen3-vl-30b'), 'qwen3-vl-30b');
	assert.equal(transport.modelName(undefined), '');
});

test('LoRA adapters: per-request scales by name, checked before the request', () => {
	const body = chat.buildChatBody({
		model: 'tiny-lora',
		messageMode: 'simple',
		userMessage: 'Hi',
		lora: [
			{ name: ' terse ', scale: 1 },
			{ name: 'style', scale: 0 },
		],
	});
	assert.deepEqual(body.lora, [
		{ name: 'terse', scale: 1 },
		{ name: 'style', scale: 0 },
	]);
	// none chosen: no lora field at all (the model's own scales apply)
	assert.equal(
		chat.buildChatBody({ model: 'tiny', messageMode: 'simple', userMessage: 'Hi', lora: [] }).lora,
		undefined,
	);
	const bad = (lora) => () =>
		chat.buildChatBody({ model: 'tiny-lora', messageMode: 'simple', userMessage: 'Hi', lora });
	assert.throws(bad([{ name: '', scale: 1 }]), /name the adapter/);
	assert.throws(bad([{ name: 'terse', scale: -1 }]), /from 0 \(off\) to 10/);
	assert.throws(bad([{ name: 'terse', scale: 11 }]), /from 0 \(off\) to 10/);
	assert.throws(
		bad([
			{ name: 'terse', scale: 1 },
			{ name: 'terse', scale: 0 },
		]),
		/listed twice/,
	);
});
