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

	// n8n's lint wants a string literal here: tests/test_n8n_install.py checks it is readmeUrl(<this anchor>)
	// (nodes/shared/docs.ts), like the nodes' links
	documentationUrl =
		'https://github.com/model-orchestrator/model-orchestrator/blob/main/n8n-nodes/README.md#credential-model-orchestrator-api';

	properties: INodeProperties[] = [
		{
			displayName: 'Base URL',
			name: 'baseUrl',
			type: 'string',
			default: 'http://127.0.0.1:8000',
			placeholder: 'http://127.0.0.1:8000',
			description:
				"Where the model-orchestrator sidecar listens, without /v1. The default is where `make run` serves it. More than one machine: several URLs separated by commas, or one URL whose sidecar lists the others (its MODEL_ORCHESTRATOR_FLEET, e.g. the Kubernetes headless Service's name, which resolves to every sidecar).",
			hint: 'In the compose stack the sidecar is http://llama-cpp:8000 (compose fills this in); in Kubernetes http://model-orchestrator.<namespace>.svc:8000',
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
			// the first URL (a fleet's others are asked by the nodes, each skipped with a message when it does not answer)
			baseURL:
				'={{$credentials.baseUrl.split(/[\\s,;]+/).filter(Boolean)[0].replace(/\\/+$/, "").replace(/\\/v1$/, "")}}',
			url: '/models/status',
		},
	};
}
