import type { INodeType, INodeTypeDescription, ISupplyDataFunctions } from 'n8n-workflow';
import { NodeConnectionTypes } from 'n8n-workflow';
import { supplyModel } from '@n8n/ai-node-sdk';

import { getModels, normaliseBaseUrl } from '../shared/transport';
import { readmeUrl } from '../shared/docs';

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
		version: [1],
		subtitle: '={{$parameter["model"]}}',
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
			{
				displayName: 'Model Name or ID',
				name: 'model',
				type: 'options',
				typeOptions: { loadOptionsMethod: 'getModels' },
				default: '',
				required: true,
				description:
					'The sidecar loads it on the first request if it is not loaded. Choose from the list, or specify an ID using an <a href="https://docs.n8n.io/code/expressions/">expression</a>.',
			},
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
						description: 'How long a request may take, including a load on demand',
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

	methods = {
		loadOptions: { getModels },
	};

	async supplyData(this: ISupplyDataFunctions, itemIndex: number) {
		const credentials = await this.getCredentials('modelOrchestratorApi');
		const model = this.getNodeParameter('model', itemIndex) as string;
		const options = this.getNodeParameter('options', itemIndex, {}) as ModelOptions;
		const apiKey = String(credentials.apiKey ?? '');

		return supplyModel(this, {
			type: 'openai',
			baseUrl: `${normaliseBaseUrl(credentials.baseUrl)}/v1`,
			// the OpenAI client needs a key; a sidecar without one ignores it
			apiKey: apiKey || 'no-key',
			model,
			temperature: options.temperature,
			maxTokens: options.maxTokens,
			topP: options.topP,
			frequencyPenalty: options.frequencyPenalty,
			presencePenalty: options.presencePenalty,
			maxRetries: options.maxRetries,
			timeout: (options.timeoutS ?? 600) * 1000,
		});
	}
}
