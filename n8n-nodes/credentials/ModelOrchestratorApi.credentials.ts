import type {
	IAuthenticateGeneric,
	Icon,
	ICredentialTestRequest,
	ICredentialType,
	INodeProperties,
} from 'n8n-workflow';

export class ModelOrchestratorApi implements ICredentialType {
	name = 'modelOrchestratorApi';

	displayName = 'Model Orchestrator API';

	icon: Icon = {
		light: 'file:../icons/modelOrchestrator.svg',
		dark: 'file:../icons/modelOrchestrator.dark.svg',
	};

	documentationUrl = 'https://github.com/model-orchestrator/model-orchestrator#readme';

	properties: INodeProperties[] = [
		{
			displayName: 'Base URL',
			name: 'baseUrl',
			type: 'string',
			default: 'http://llama-cpp:8000',
			placeholder: 'http://llama-cpp:8000',
			description:
				'Where the model-orchestrator sidecar listens, without /v1 (for example http://llama-cpp:8000 or http://127.0.0.1:8000)',
			required: true,
		},
		{
			displayName: 'API Key',
			name: 'apiKey',
			type: 'string',
			typeOptions: { password: true },
			default: '',
			description:
				'The sidecar\'s MODEL_ORCHESTRATOR_API_KEY, sent as "Authorization: Bearer <key>". Leave empty when the sidecar has no key.',
		},
	];

	authenticate: IAuthenticateGeneric = {
		type: 'generic',
		properties: {
			headers: {
				Authorization: '={{$credentials.apiKey ? "Bearer " + $credentials.apiKey : ""}}',
			},
		},
	};

	test: ICredentialTestRequest = {
		request: {
			baseURL: '={{$credentials.baseUrl.replace(/\\/+$/, "").replace(/\\/v1$/, "")}}',
			url: '/models/status',
		},
	};
}
