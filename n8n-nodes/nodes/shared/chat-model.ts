/**
 * The Chat Model sub-node's model: an `@n8n/ai-node-sdk` chat model whose every request goes over the fleet
 * (fleet-chat.ts: to the node that holds the model, else where it fits; on to the next node when one stops
 * answering; the Timeout sent as X-Queue-Timeout-S). The conversions to and from OpenAI's chat format are pure
 * functions (the tests call them).
 */
import {
	BaseChatModel,
	getParametersJsonSchema,
	type ChatModelConfig,
	type FinishReason,
	type GenerateResult,
	type Message,
	type MessageContent,
	type StreamChunk,
} from '@n8n/ai-node-sdk';
import type { IDataObject } from 'n8n-workflow';

import type { Routed } from './fleet-chat';

function text(parts: MessageContent[]): string {
	return parts
		.filter((p) => p.type === 'text')
		.map((p) => (p as { text: string }).text)
		.join('');
}

function fileUrl(part: { mediaType?: string; data: string | Uint8Array }): string {
	const data =
		typeof part.data === 'string' ? part.data : Buffer.from(part.data).toString('base64');
	return data.startsWith('data:')
		? data
		: `data:${part.mediaType ?? 'application/octet-stream'};base64,${data}`;
}

/** The SDK's messages as OpenAI chat messages: text, images as data URLs, tool calls and their results. */
export function toOpenAiMessages(messages: Message[]): IDataObject[] {
	const out: IDataObject[] = [];
	for (const m of messages) {
		if (m.role === 'tool') {
			for (const p of m.content) {
				if (p.type !== 'tool-result') continue;
				const content = typeof p.result === 'string' ? p.result : JSON.stringify(p.result);
				out.push({ role: 'tool', tool_call_id: p.toolCallId, content });
			}
			continue;
		}
		if (m.role === 'assistant') {
			const calls = m.content
				.filter((p) => p.type === 'tool-call')
				.map((p) => {
					const call = p as { toolCallId?: string; toolName: string; input: string };
					return {
						id: call.toolCallId,
						type: 'function',
						function: { name: call.toolName, arguments: call.input },
					};
				});
			const content = text(m.content);
			out.push({
				role: 'assistant',
				content: content || (calls.length ? null : ''),
				...(calls.length ? { tool_calls: calls } : {}),
			});
			continue;
		}
		const files = m.content.filter((p) => p.type === 'file');
		if (!files.length) {
			out.push({ role: m.role, content: text(m.content) });
			continue;
		}
		const parts: IDataObject[] = [];
		for (const p of m.content) {
			if (p.type === 'text') parts.push({ type: 'text', text: p.text });
			else if (p.type === 'file') parts.push({ type: 'image_url', image_url: { url: fileUrl(p) } });
		}
		out.push({ role: m.role, content: parts });
	}
	return out;
}

const FINISH: Record<string, FinishReason> = {
	stop: 'stop',
	length: 'length',
	tool_calls: 'tool-calls',
	function_call: 'tool-calls',
	content_filter: 'content-filter',
};

/** An OpenAI chat answer as the SDK's result; providerMetadata names the node and the time in the sidecar's queue. */
export function fromOpenAiResponse(
	routed: Pick<Routed, 'body' | 'node' | 'queue_wait_s'>,
): GenerateResult {
	const body = routed.body;
	const choice = ((body.choices as IDataObject[]) ?? [])[0];
	if (!choice) throw new Error(`${routed.node}: the sidecar answered without choices`);
	const message = (choice.message ?? {}) as IDataObject;
	const content: MessageContent[] = [];
	if (typeof message.reasoning_content === 'string' && message.reasoning_content) {
		content.push({ type: 'reasoning', text: message.reasoning_content });
	}
	if (typeof message.content === 'string' && message.content)
		content.push({ type: 'text', text: message.content });
	for (const call of (message.tool_calls as IDataObject[]) ?? []) {
		const fn = (call.function ?? {}) as IDataObject;
		const args =
			typeof fn.arguments === 'string' ? fn.arguments : JSON.stringify(fn.arguments ?? {});
		content.push({
			type: 'tool-call',
			toolCallId: call.id as string,
			toolName: String(fn.name),
			input: args,
		});
	}
	const usage = (body.usage ?? {}) as IDataObject;
	return {
		id: body.id as string | undefined,
		finishReason: FINISH[String(choice.finish_reason)] ?? 'other',
		usage: body.usage
			? {
					promptTokens: Number(usage.prompt_tokens ?? 0),
					completionTokens: Number(usage.completion_tokens ?? 0),
					totalTokens: Number(usage.total_tokens ?? 0),
				}
			: undefined,
		message: { role: 'assistant', content, id: body.id as string | undefined },
		providerMetadata: {
			node: routed.node,
			queue_wait_s: routed.queue_wait_s,
			model: body.model ?? null,
		},
		rawResponse: body,
	};
}

export type Send = (body: IDataObject) => Promise<Routed>;

export class FleetChatModel extends BaseChatModel {
	constructor(
		private readonly send: Send,
		modelId: string,
		config?: ChatModelConfig,
	) {
		super('model-orchestrator', modelId, config);
	}

	/** The OpenAI request body: only the options set (the sidecar's model keeps its own defaults otherwise). */
	body(messages: Message[], config?: ChatModelConfig): IDataObject {
		const c = this.mergeConfig(config);
		const body: IDataObject = {
			model: this.modelId,
			messages: toOpenAiMessages(messages),
			stream: false,
		};
		const set = (key: string, value: unknown) => {
			if (value !== undefined && value !== null) body[key] = value;
		};
		set('temperature', c.temperature);
		set('max_tokens', c.maxTokens);
		set('top_p', c.topP);
		set('frequency_penalty', c.frequencyPenalty);
		set('presence_penalty', c.presencePenalty);
		set('seed', c.seed);
		if (c.stopSequences?.length) body.stop = c.stopSequences;
		const tools = this.tools
			.filter((t) => t.type === 'function')
			.map((t) => ({
				type: 'function',
				function: {
					name: t.name,
					...(t.description ? { description: t.description } : {}),
					parameters: getParametersJsonSchema(t),
				},
			}));
		if (tools.length) body.tools = tools;
		return body;
	}

	async generate(messages: Message[], config?: ChatModelConfig): Promise<GenerateResult> {
		return fromOpenAiResponse(await this.send(this.body(messages, config)));
	}

	/** The answer arrives whole (the node does not stream), then goes out as chunks. */
	async *stream(messages: Message[], config?: ChatModelConfig): AsyncIterable<StreamChunk> {
		const result = await this.generate(messages, config);
		for (const part of result.message.content) {
			if (part.type === 'text') yield { type: 'text-delta', delta: part.text };
			else if (part.type === 'reasoning') yield { type: 'reasoning-delta', delta: part.text };
			else if (part.type === 'tool-call') {
				yield {
					type: 'tool-call-delta',
					id: part.toolCallId,
					name: part.toolName,
					argumentsDelta: part.input,
				};
			}
		}
		yield { type: 'finish', finishReason: result.finishReason ?? 'stop', usage: result.usage };
	}
}

/**
 * The SDK's tracer logs each answer's `text` and `generationInfo` as the sub-node's output, not the message's
 * metadata: copy the node and the queue wait there, so the output says where the request ran and how long it
 * waited. Harmless when the tracer is shaped otherwise (nothing is changed then).
 */
export function showNodeInOutput(model: unknown): void {
	const m = model as { callbacks?: unknown; bindTools?: (...args: unknown[]) => unknown };
	const bindTools = m?.bindTools;
	if (typeof bindTools === 'function') {
		// an agent binds its tools first: a new model, with a tracer of its own
		m.bindTools = function (this: unknown, ...args: unknown[]) {
			const bound = bindTools.apply(this, args);
			showNodeInOutput(bound);
			return bound;
		};
	}
	const callbacks = m?.callbacks;
	if (!Array.isArray(callbacks)) return;
	for (const tracer of callbacks as Array<{ handleLLMEnd?: (...args: unknown[]) => unknown }>) {
		const end = tracer?.handleLLMEnd;
		if (typeof end !== 'function') continue;
		tracer.handleLLMEnd = async function (this: unknown, output: unknown, ...rest: unknown[]) {
			const generations = (output as { generations?: unknown[][] })?.generations ?? [];
			for (const g of generations.flat() as Array<{
				generationInfo?: IDataObject;
				message?: IDataObject;
			}>) {
				const meta = (g.message?.response_metadata ?? {}) as IDataObject;
				if ('node' in meta) {
					g.generationInfo = {
						...g.generationInfo,
						node: meta.node,
						queue_wait_s: meta.queue_wait_s,
					};
				}
			}
			return await end.call(this, output, ...rest);
		};
	}
}
