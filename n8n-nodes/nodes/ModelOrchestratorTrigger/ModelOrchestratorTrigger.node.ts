import type {
	IDataObject,
	INodeType,
	INodeTypeDescription,
	ITriggerFunctions,
	ITriggerResponse,
} from 'n8n-workflow';
import { NodeConnectionTypes, sleep } from 'n8n-workflow';

import { readmeUrl } from '../shared/docs';
import { eventsQuery, SseParser } from '../shared/events';
import { CREDENTIAL_NAME, normaliseBaseUrl } from '../shared/transport';

const RECONNECT_MS = 2000;

export class ModelOrchestratorTrigger implements INodeType {
	description: INodeTypeDescription = {
		displayName: 'Model Orchestrator Trigger',
		name: 'modelOrchestratorTrigger',
		icon: {
			light: 'file:../../icons/trigger.svg',
			dark: 'file:../../icons/trigger.dark.svg',
		},
		group: ['trigger'],
		version: 1,
		documentationUrl: readmeUrl('model-orchestrator-trigger'),
		subtitle: '={{$parameter["events"].join(", ")}}',
		description:
			'Starts the workflow when the model-orchestrator sidecar reports an event: a model loaded, evicted or failed, or GPU memory ran low',
		eventTriggerDescription: 'Waiting for a model-orchestrator event',
		defaults: {
			name: 'Model Orchestrator Trigger',
		},
		inputs: [],
		outputs: [NodeConnectionTypes.Main],
		credentials: [{ name: 'modelOrchestratorApi', required: true }],
		properties: [
			{
				displayName: 'Trigger On',
				name: 'events',
				type: 'multiOptions',
				required: true,
				default: ['loaded'],
				options: [
					{
						name: 'Memory Low',
						value: 'memoryLow',
						description:
							'A GPU\'s free memory fell below the sidecar\'s margin, or a load or reservation was refused for lack of GPU memory',
					},
					{
						name: 'Model Evicted',
						value: 'evicted',
						description: 'A model was unloaded to make room for another (says which and why)',
					},
					{
						name: 'Model Failed',
						value: 'failed',
						description: 'A load failed or llama-server crashed (with its last log lines)',
					},
					{
						name: 'Model Loaded',
						value: 'loaded',
						description: 'A model finished loading and serves requests',
					},
					{
						name: 'Model State Changed',
						value: 'stateChanged',
						description: 'Any state change (unloaded, loading, loaded, unloading, failed)',
					},
					{
						name: 'Model Unloaded',
						value: 'unloaded',
						description: 'A model was unloaded (request, idle, eviction)',
					},
				],
			},
			{
				displayName: 'Models',
				name: 'models',
				type: 'string',
				default: '',
				placeholder: 'qwen3-vl-30b, tiny',
				description: 'Only events of these models (comma-separated IDs); empty: every model',
			},
		],
	};

	async trigger(this: ITriggerFunctions): Promise<ITriggerResponse> {
		const choices = this.getNodeParameter('events', []) as string[];
		const models = String(this.getNodeParameter('models', '') ?? '').split(',');
		const credentials = await this.getCredentials(CREDENTIAL_NAME);
		const url = `${normaliseBaseUrl(credentials.baseUrl)}/models/events`;
		const qs = eventsQuery(choices, models);
		const parser = new SseParser();
		let closed = false;
		let controller: AbortController | undefined;
		const emitEvent = (event: string, data: IDataObject) => {
			this.emit([this.helpers.returnJsonArray([{ event, ...data }])]);
		};

		/** One connection: emits events until the stream ends or fails. */
		const connect = async (onFirst?: (event: string, data: IDataObject) => void): Promise<void> => {
			controller = new AbortController();
			const headers: IDataObject = { Accept: 'text/event-stream' };
			if (parser.lastEventId) headers['Last-Event-ID'] = parser.lastEventId;
			// The credential's `authenticate` is an expression, and a trigger's long-lived connection runs outside
			// the expression isolate n8n 2.40 acquires for executions ("No bridge acquired"): send the same Bearer
			// header directly.
			if (credentials.apiKey) headers.Authorization = `Bearer ${String(credentials.apiKey)}`;
			try {
				const stream = (await this.helpers.httpRequest({
					method: 'GET',
					url,
					qs,
					headers,
					encoding: 'stream',
					json: false,
					abortSignal: controller.signal,
				})) as NodeJS.ReadableStream;
				for await (const chunk of stream) {
					for (const ev of parser.push(chunk.toString())) {
						if (ev.event === 'overflow') continue; // the stream ends next; we reconnect with Last-Event-ID
						if (onFirst) onFirst(ev.event, ev.data);
						else emitEvent(ev.event, ev.data);
					}
				}
			} catch (error) {
				if (closed) return;
				this.logger.warn(`Model Orchestrator Trigger: event stream failed: ${(error as Error).message}`);
			}
		};

		/** Stay connected until the workflow is deactivated: reconnect (with Last-Event-ID) when the stream ends. */
		const listen = async (): Promise<void> => {
			while (!closed) {
				await connect();
				if (!closed) await sleep(RECONNECT_MS);
			}
		};

		const closeFunction = async () => {
			closed = true;
			controller?.abort();
		};

		if (this.getMode() === 'manual') {
			// "Test step": wait for the first matching event, then stop listening
			const manualTriggerFunction = async () => {
				await new Promise<void>((resolve) => {
					void connect((event, data) => {
						emitEvent(event, data);
						closed = true;
						controller?.abort();
						resolve();
					});
				});
			};
			return { closeFunction, manualTriggerFunction };
		}

		void listen();
		return { closeFunction };
	}
}
