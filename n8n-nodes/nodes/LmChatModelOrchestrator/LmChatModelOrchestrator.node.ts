import type {
	IDataObject,
	INodeType,
	INodeTypeDescription,
	ISupplyDataFunctions,
	NodeApiError,
} from 'n8n-workflow';
import { NodeConnectionTypes } from 'n8n-workflow';
import { supplyModel } from '@n8n/ai-node-sdk';

import { FleetChatModel, showNodeInOutput } from '../shared/chat-model';
import { readmeUrl } from '../shared/docs';
import { Fleet } from '../shared/fleet';
import { chatOnFleet, chatRequest, HTTP_MARGIN_S } from '../shared/fleet-chat';
import { modelLocator, modelOptionsV1, modelParameter, modelPickers } from '../shared/model-field';
import { asNodeError } from '../shared/transport';

const MODEL_DESCRIPTION =
	'Its requests go to the node that holds it, else to one where it fits, which loads it on the first request.';

type ModelOptions = {
	temperature?: number;
	maxTokens?: number;
	topP?: number;
	frequencyPenalty?: number;
	presencePenalty?: number;
	timeoutS?: number;
	maxRetries?: number;
};

export class LmChatModelOrchestrator implements INodeType {
	description: INodeTypeDescription = {
		displayName: 'Model Orchestrator Chat Model',
		name: 'lmChatModelOrchestrator',
		icon: {
			light: 'file:../../icons/chatModel.svg',
			dark: 'file:../../icons/chatModel.dark.svg',
		},
		documentationUrl: readmeUrl('chat-model-for-the-ai-agent'),
		group: ['transform'],
		version: [1, 2],
		defaultVersion: 2,
		subtitle: '={{$parameter["model"].value ?? $parameter["model"]}}',
		description:
			'A local llama.cpp model served by the model-orchestrator sidecar, for the AI Agent and other AI nodes (loaded on demand)',
		defaults: {
			name: 'Model Orchestrator Chat Model',
		},
		codex: {
			categories: ['AI'],
			subcategories: {
				AI: ['Language Models', 'Root Nodes'],
				'Language Models': ['Chat Models (Recommended)'],
			},
			resources: {
				primaryDocumentation: [
					{ url: readmeUrl('chat-model-for-the-ai-agent') },
				],
			},
		},
		inputs: [],
		outputs: [NodeConnectionTypes.AiLanguageModel],
		outputNames: ['Model'],
		credentials: [{ name: 'modelOrchestratorApi', required: true }],
		properties: [
			modelOptionsV1(MODEL_DESCRIPTION),
			modelLocator(MODEL_DESCRIPTION, {}, [2]),
			{
				displayName: 'Options',
				name: 'options',
				placeholder: 'Add Option',
				description: 'Additional options to add',
				type: 'collection',
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
						displayName: 'Max Retries',
						name: 'maxRetries',
						type: 'number',
						default: 2,
						typeOptions: { minValue: 0 },
						description:
							'How often a request is sent again after a 5xx answer other than the queue\'s own (queue_timeout, queue_full). A node that stops answering is left and the request goes to the next one anyway.',
					},
					{
						displayName: 'Max Tokens',
						name: 'maxTokens',
						type: 'number',
						default: 1024,
						typeOptions: { minValue: 1 },
					},
					{
						displayName: 'Presence Penalty',
						name: 'presencePenalty',
						type: 'number',
						default: 0,
						typeOptions: { minValue: -2, maxValue: 2, numberPrecision: 2 },
					},
					{
						displayName: 'Sampling Temperature',
						name: 'temperature',
						default: 0.7,
						typeOptions: { maxValue: 2, minValue: 0, numberPrecision: 1 },
						type: 'number',
					},
					{
						displayName: 'Timeout (Seconds)',
						name: 'timeoutS',
						type: 'number',
						default: 600,
						typeOptions: { minValue: 1 },
						description: `How long each request may take: waiting in the sidecar's queue (a load on demand, other requests for the model first), then the answer. The sidecar gets it as X-Queue-Timeout-S and gives up waiting at the same time (queue_timeout); the node waits ${HTTP_MARGIN_S} s longer for that answer. Each answer's output (generationInfo) says its node and queue_wait_s.`,
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

	async supplyData(this: ISupplyDataFunctions, itemIndex: number) {
		const model = modelParameter.call(this, itemIndex);
		const options = this.getNodeParameter('options', itemIndex, {}) as ModelOptions;
		const fleet = await Fleet.open(this);
		const timeoutS = options.timeoutS ?? 600;
		const retries = Math.max(0, options.maxRetries ?? 2);
		const send = async (body: IDataObject) => {
			for (let attempt = 0; ; attempt++) {
				try {
					return await chatOnFleet(fleet, model, chatRequest(body, timeoutS), itemIndex);
				} catch (error) {
					if (attempt >= retries || !retryable(error)) throw asNodeError(this.getNode(), error, itemIndex);
				}
			}
		};
		const chatModel = new FleetChatModel(send, model, {
			temperature: options.temperature,
			maxTokens: options.maxTokens,
			topP: options.topP,
			frequencyPenalty: options.frequencyPenalty,
			presencePenalty: options.presencePenalty,
		});
		const supplied = supplyModel(this, chatModel);
		showNodeInOutput(supplied.response);
		return supplied;
	}
}

/** A 5xx answer other than the queue's own refusals (which say the wait is over). */
function retryable(error: unknown): boolean {
	const e = error as NodeApiError;
	return /^5/.test(String(e.httpCode ?? '')) && !['queue_timeout', 'queue_full'].includes(String(e.context?.code));
}
