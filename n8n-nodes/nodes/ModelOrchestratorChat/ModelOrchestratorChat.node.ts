import type {
	IDataObject,
	IExecuteFunctions,
	INodeExecutionData,
	INodeType,
	INodeTypeDescription,
} from 'n8n-workflow';
import { NodeConnectionTypes, NodeOperationError } from 'n8n-workflow';

import {
	buildChatBody,
	parseChatResponse,
	selectImageProperties,
	type ChatOptions,
	type ChatParams,
	type ImageInput,
	type LoraScale,
	MAX_LORA_SCALE,
} from '../shared/chat';
import { readmeUrl } from '../shared/docs';
import type { ChatCompletionRequest } from '../shared/api';
import { runPerItem, type ItemResult } from '../shared/execute';
import { Fleet } from '../shared/fleet';
import { chatOnFleet, chatRequest, HTTP_MARGIN_S } from '../shared/fleet-chat';
import { modelLocator, modelOptionsV1, modelParameter, modelPickers } from '../shared/model-field';

const MODEL_DESCRIPTION =
	'The model to chat with: the request goes to the node that holds it, else to one where it fits, which loads it on demand.';

interface NodeOptions extends ChatOptions {
	toolChoice?: ChatParams['toolChoice'];
	toolChoiceFunction?: string;
	timeoutS?: number;
	includeFullResponse?: boolean;
}

export class ModelOrchestratorChat implements INodeType {
	description: INodeTypeDescription = {
		displayName: 'Model Orchestrator Chat',
		name: 'modelOrchestratorChat',
		icon: {
			light: 'file:../../icons/chat.svg',
			dark: 'file:../../icons/chat.dark.svg',
		},
		documentationUrl: readmeUrl('chat'),
		group: ['transform'],
		version: [1, 2],
		defaultVersion: 2,
		subtitle: '={{$parameter["model"].value ?? $parameter["model"]}}',
		description:
			'Chat with a local llama.cpp model through the model-orchestrator sidecar: text, images from binary data, tools',
		defaults: {
			name: 'Chat',
		},
		usableAsTool: true,
		inputs: [NodeConnectionTypes.Main],
		outputs: [NodeConnectionTypes.Main],
		credentials: [{ name: 'modelOrchestratorApi', required: true }],
		properties: [
			modelOptionsV1(MODEL_DESCRIPTION),
			modelLocator(MODEL_DESCRIPTION, {}, [2]),
			{
				displayName: 'Input',
				name: 'messageMode',
				type: 'options',
				noDataExpression: true,
				default: 'simple',
				options: [
					{ name: 'System Prompt and User Message', value: 'simple' },
					{
						name: 'Messages (JSON)',
						value: 'messages',
						description: 'A full OpenAI messages array',
					},
				],
			},
			{
				displayName: 'System Prompt',
				name: 'systemPrompt',
				type: 'string',
				typeOptions: { rows: 3 },
				default: '',
				displayOptions: { show: { messageMode: ['simple'] } },
			},
			{
				displayName: 'User Message',
				name: 'userMessage',
				type: 'string',
				typeOptions: { rows: 4 },
				default: '',
				required: true,
				displayOptions: { show: { messageMode: ['simple'] } },
			},
			{
				displayName: 'Messages',
				name: 'messages',
				type: 'json',
				default:
					'[\n  {"role": "system", "content": "You are a helpful assistant."},\n  {"role": "user", "content": "Hello"}\n]',
				description: 'OpenAI chat messages: [{"role": "user", "content": "..."}, ...]',
				displayOptions: { show: { messageMode: ['messages'] } },
			},
			{
				displayName: 'Images From Binary',
				name: 'images',
				type: 'options',
				default: 'auto',
				description:
					'Images of the input item sent with the (last) user message as data URLs; the model needs a vision projector',
				options: [
					{
						name: 'All Image Properties',
						value: 'auto',
						description: 'Every binary property whose MIME type is image/*',
					},
					{ name: 'Selected Properties', value: 'properties' },
					{ name: 'None', value: 'none' },
				],
			},
			{
				displayName: 'Binary Properties',
				name: 'binaryProperties',
				type: 'string',
				default: 'data',
				description: 'Names of the binary properties to send, comma-separated',
				displayOptions: { show: { images: ['properties'] } },
			},
			{
				displayName: 'Tools',
				name: 'tools',
				type: 'json',
				default: '[]',
				description:
					'OpenAI tool definitions: [{"type": "function", "function": {"name": ..., "description": ..., "parameters": {JSON schema}}}]. Calls come back in tool_calls.',
			},
			{
				displayName: 'LoRA Adapters',
				name: 'loraAdapters',
				type: 'fixedCollection',
				placeholder: 'Add Adapter',
				default: {},
				typeOptions: { multipleValues: true },
				description:
					"Scales of the model's LoRA adapters for this request (the model registry's lora; GET /models/{model}/lora-adapters lists them). Adapters not listed keep the model's current scales.",
				options: [
					{
						displayName: 'Adapter',
						name: 'adapter',
						values: [
							{
								displayName: 'Name',
								name: 'name',
								type: 'string',
								default: '',
								description: "The adapter's name in the model registry",
							},
							{
								displayName: 'Scale',
								name: 'scale',
								type: 'number',
								default: 1,
								typeOptions: { minValue: 0, maxValue: MAX_LORA_SCALE, numberPrecision: 2 },
								description: '0 switches the adapter off for this request, 1 applies it fully',
							},
						],
					},
				],
			},
			{
				displayName: 'Options',
				name: 'options',
				type: 'collection',
				placeholder: 'Add Option',
				default: {},
				options: [
					{
						displayName: 'Frequency Penalty',
						name: 'frequencyPenalty',
						type: 'number',
						default: 0,
						typeOptions: { minValue: -2, maxValue: 2, numberPrecision: 2 },
					},
					{
						displayName: 'Include Full Response',
						name: 'includeFullResponse',
						type: 'boolean',
						default: false,
						description: 'Whether to add the whole OpenAI response as "response"',
					},
					{
						displayName: 'Max Tokens',
						name: 'maxTokens',
						type: 'number',
						default: 1024,
						typeOptions: { minValue: 1 },
						description: 'The most tokens to generate',
					},
					{
						displayName: 'Presence Penalty',
						name: 'presencePenalty',
						type: 'number',
						default: 0,
						typeOptions: { minValue: -2, maxValue: 2, numberPrecision: 2 },
					},
					{
						displayName: 'Response Format',
						name: 'responseFormat',
						type: 'options',
						default: 'text',
						options: [
							{ name: 'Text', value: 'text' },
							{ name: 'JSON Object', value: 'json_object' },
						],
					},
					{
						displayName: 'Seed',
						name: 'seed',
						type: 'number',
						default: 0,
					},
					{
						displayName: 'Stop Sequences',
						name: 'stop',
						type: 'string',
						default: '',
						description: 'Comma-separated',
					},
					{
						displayName: 'Temperature',
						name: 'temperature',
						type: 'number',
						default: 0.7,
						typeOptions: { minValue: 0, maxValue: 2, numberPrecision: 2 },
					},
					{
						displayName: 'Timeout (Seconds)',
						name: 'timeoutS',
						type: 'number',
						default: 600,
						typeOptions: { minValue: 1 },
						description: `How long the whole request may take: waiting in the sidecar's queue (a load on demand, other requests for the model first), then the answer. The sidecar gets it as X-Queue-Timeout-S and gives up waiting at the same time (queue_timeout); the node waits ${HTTP_MARGIN_S} s longer for that answer. The output's queue_wait_s says how long the request waited.`,
					},
					{
						displayName: 'Tool Choice',
						name: 'toolChoice',
						type: 'options',
						default: 'auto',
						options: [
							{ name: 'Auto', value: 'auto' },
							{ name: 'None', value: 'none' },
							{ name: 'Required', value: 'required' },
							{ name: 'Specific Function', value: 'function' },
						],
					},
					{
						displayName: 'Tool Choice Function',
						name: 'toolChoiceFunction',
						type: 'string',
						default: '',
						description: 'With Tool Choice "Specific Function": the function\'s name',
					},
					{
						displayName: 'Top P',
						name: 'topP',
						type: 'number',
						default: 1,
						typeOptions: { minValue: 0, maxValue: 1, numberPrecision: 2 },
					},
				],
			},
		],
	};

	methods = modelPickers;

	async execute(this: IExecuteFunctions): Promise<INodeExecutionData[][]> {
		const fleet = await Fleet.open(this);
		return runPerItem.call(this, async function (i, item) {
			return await chatItem.call(this, fleet, i, item);
		});
	}
}

async function chatItem(
	this: IExecuteFunctions,
	fleet: Fleet,
	i: number,
	item: INodeExecutionData,
): Promise<ItemResult> {
	const messageMode = this.getNodeParameter('messageMode', i) as ChatParams['messageMode'];
	const imageMode = this.getNodeParameter('images', i, 'auto') as 'auto' | 'properties' | 'none';
	const options = this.getNodeParameter('options', i, {}) as NodeOptions;
	let names: string[];
	let body: ChatCompletionRequest;
	const images: ImageInput[] = [];
	try {
		names = selectImageProperties(
			item.binary,
			imageMode,
			imageMode === 'properties'
				? (this.getNodeParameter('binaryProperties', i, '') as string)
				: '',
		);
	} catch (error) {
		throw new NodeOperationError(this.getNode(), error as Error, { itemIndex: i });
	}
	for (const name of names) {
		const meta = item.binary![name];
		const buffer = await this.helpers.getBinaryDataBuffer(i, name);
		images.push({
			mimeType: meta.mimeType,
			base64: buffer.toString('base64'),
			fileName: meta.fileName,
		});
	}
	const params: ChatParams = {
		model: modelParameter.call(this, i),
		messageMode,
		images,
		tools: this.getNodeParameter('tools', i, '') as unknown,
		toolChoice: options.toolChoice,
		toolChoiceFunction: options.toolChoiceFunction,
		options,
		lora: (this.getNodeParameter('loraAdapters', i, {}) as { adapter?: LoraScale[] }).adapter ?? [],
	};
	if (messageMode === 'simple') {
		params.systemPrompt = this.getNodeParameter('systemPrompt', i, '') as string;
		params.userMessage = this.getNodeParameter('userMessage', i, '') as string;
	} else {
		params.messages = this.getNodeParameter('messages', i) as unknown;
	}
	try {
		body = buildChatBody(params);
	} catch (error) {
		throw new NodeOperationError(this.getNode(), error as Error, { itemIndex: i });
	}
	const routed = await chatOnFleet(
		fleet,
		body.model as string,
		chatRequest(body as IDataObject, options.timeoutS ?? 600),
		i,
	);
	const json: IDataObject = {
		...parseChatResponse(routed.body),
		images_sent: images.length,
		node: routed.node,
		queue_wait_s: routed.queue_wait_s,
	};
	if (options.includeFullResponse) json.response = routed.body;
	return { json };
}
