import type {
	IDataObject,
	IHttpRequestOptions,
	INodeType,
	INodeTypeDescription,
	ITriggerFunctions,
	ITriggerResponse,
} from 'n8n-workflow';
import { NodeConnectionTypes, sleep } from 'n8n-workflow';

import { readmeUrl } from '../shared/docs';
import { eventsQuery, SseParser } from '../shared/events';
import { credentialUrls, hostOf, PROBE_TIMEOUT_MS } from '../shared/fleet';
import { CREDENTIAL_NAME } from '../shared/transport';

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
			'Starts the workflow when a model-orchestrator sidecar (any of the fleet) reports an event: a model loaded, evicted or failed, or GPU memory ran low',
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
		const qs = eventsQuery(choices, models);
		// The credential's `authenticate` is an expression, and a trigger's long-lived connection runs outside the
		// expression isolate n8n 2.40 acquires for executions ("No bridge acquired"): send the same Bearer header
		// directly.
		const auth: IDataObject = credentials.apiKey ? { Authorization: `Bearer ${String(credentials.apiKey)}` } : {};
		const get = async (url: string, extra: Partial<IHttpRequestOptions> = {}) =>
			await this.helpers.httpRequest({ method: 'GET', url, headers: auth, timeout: PROBE_TIMEOUT_MS, ...extra });
		let closed = false;
		const controllers = new Set<AbortController>();
		const emitEvent = (node: string, event: string, data: IDataObject) => {
			this.emit([this.helpers.returnJsonArray([{ event, node, ...data }])]);
		};

		/** The sidecars: the credential's URLs, or the fleet its one sidecar lists (GET /fleet). */
		let urls = credentialUrls(credentials.baseUrl);
		if (urls.length === 1) {
			try {
				const fleet = (await get(`${urls[0]}/fleet`, { json: true })) as IDataObject;
				if (Array.isArray(fleet?.members) && fleet.members.length) urls = fleet.members as string[];
			} catch {
				// an older sidecar without /fleet, or none yet: listen to the one URL
			}
		}

		/** One sidecar's event stream: emits its events, each with its node, until it ends or fails. */
		const listener = (url: string) => {
			const parser = new SseParser();
			let node = hostOf(url);
			return async (onEvent: (node: string, event: string, data: IDataObject) => void): Promise<void> => {
				const controller = new AbortController();
				controllers.add(controller);
				const headers: IDataObject = { ...auth, Accept: 'text/event-stream' };
				if (parser.lastEventId) headers['Last-Event-ID'] = parser.lastEventId;
				try {
					const health = (await get(`${url}/health`, { json: true })) as IDataObject;
					if (typeof health?.node === 'string') node = health.node;
					const stream = (await this.helpers.httpRequest({
						method: 'GET',
						url: `${url}/models/events`,
						qs,
						headers,
						encoding: 'stream',
						json: false,
						abortSignal: controller.signal,
					})) as NodeJS.ReadableStream;
					for await (const chunk of stream) {
						for (const ev of parser.push(chunk.toString())) {
							if (ev.event === 'overflow') continue; // the stream ends next; we reconnect with Last-Event-ID
							onEvent(node, ev.event, ev.data);
						}
					}
				} catch (error) {
					if (closed) return;
					this.logger.warn(`Model Orchestrator Trigger: event stream of ${node} failed: ${(error as Error).message}`);
				} finally {
					controllers.delete(controller);
				}
			};
		};
		const connections = urls.map(listener);

		/** Stay connected to every sidecar until the workflow is deactivated (reconnect with Last-Event-ID). */
		const listen = async (connect: ReturnType<typeof listener>): Promise<void> => {
			while (!closed) {
				await connect(emitEvent);
				if (!closed) await sleep(RECONNECT_MS);
			}
		};

		const closeFunction = async () => {
			closed = true;
			for (const c of controllers) c.abort();
		};

		if (this.getMode() === 'manual') {
			// "Test step": wait for the first matching event of any sidecar, then stop listening
			const manualTriggerFunction = async () => {
				await new Promise<void>((resolve) => {
					for (const connect of connections) {
						void connect((node, event, data) => {
							if (closed) return;
							emitEvent(node, event, data);
							void closeFunction();
							resolve();
						});
					}
				});
			};
			return { closeFunction, manualTriggerFunction };
		}

		for (const connect of connections) void listen(connect);
		return { closeFunction };
	}
}
