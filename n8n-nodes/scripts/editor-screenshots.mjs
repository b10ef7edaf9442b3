// Drives a running n8n editor in headless Chromium (Debian's `chromium`, puppeteer-core): signs in, opens each
// given workflow (already imported, same id as in its file) and saves a PNG of the editor (header and tab bar
// included) as <out>/workflow-<file name>.png. Then either opens every node's settings and reads the issues the
// editor shows there (the red "The value … is not supported!" of a dropdown, a missing required value, a credential
// problem) and the issue marks of the canvas; or, with --execute, presses "Execute workflow" as a person would,
// waits for the run to end, reads the toast and each node's status on the canvas, opens the Logs panel on the
// node that holds the result (the first of --output-nodes that ran) and takes the PNG then. Prints a JSON report on
// stdout: {"<file>": {"png": path, "issues": {node: [..]}, "execution": {toast, nodes: {node: status}}}}.
// tests/test_n8n_editor.py asserts an empty issue list; tests/test_first_hour.py executes every shipped workflow
// on the stack `make run` and `make n8n-demo` start (`make screenshots` keeps those PNGs in docs/).
//
//   node scripts/editor-screenshots.mjs --url http://127.0.0.1:5678 --email E --password P --out DIR [--execute] wf.json...
import { readFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { parseArgs } from 'node:util';
import puppeteer from 'puppeteer-core';

const { values: opts, positionals: files } = parseArgs({
	allowPositionals: true,
	options: {
		url: { type: 'string' },
		email: { type: 'string' },
		password: { type: 'string' },
		out: { type: 'string' },
		chromium: { type: 'string', default: process.env.CHROMIUM_BIN || '/usr/bin/chromium' },
		execute: { type: 'boolean', default: false },
		'output-nodes': {
			type: 'string',
			default: 'Process Response,AI Agent,Description,No Vision Model,Chat,Load Failed',
		},
		'run-timeout-s': { type: 'string', default: '600' },
	},
});
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const log = (...a) => console.error('[editor-screenshots]', ...a);
const inflight = new Map(); // the page's requests under way (websockets are not requests), to know when it settled

const browser = await puppeteer.launch({
	executablePath: opts.chromium,
	headless: true,
	args: [
		'--no-sandbox',
		'--disable-gpu',
		'--disable-dev-shm-usage',
		'--disable-background-networking',
		'--disable-extensions',
		'--no-first-run',
		'--hide-scrollbars',
		'--mute-audio',
	],
	defaultViewport: { width: 1600, height: 800, deviceScaleFactor: 1 },
});
const report = {};
try {
	const page = await browser.newPage();
	page.setDefaultTimeout(60_000);
	trackRequests(page);
	await signIn(page);
	for (const file of files) {
		const wf = JSON.parse(readFileSync(file, 'utf8'));
		const name = basename(file, '.json');
		log(`workflow ${wf.id} (${name})`);
		await page.goto(`${opts.url}/workflow/${wf.id}`, { waitUntil: 'networkidle2' });
		await page.waitForSelector('[data-test-id="canvas-node"]');
		await settle(page);
		await fitView(page);
		const png = join(opts.out, `workflow-${name}.png`);
		const issues = {};
		const add = (node, list) => {
			if (list.length) issues[node] = [...(issues[node] ?? []), ...list];
		};
		for (const [node, list] of Object.entries(await canvasIssues(page))) add(node, list);
		if (opts.execute) {
			const execution = await execute(page);
			await showOutput(page, execution);
			await page.screenshot({ path: png });
			report[name] = { png, issues, execution };
			continue;
		}
		await page.screenshot({ path: png });
		for (const node of wf.nodes) {
			add(node.name, await ndvIssues(page, wf.id, node));
		}
		report[name] = { png, issues };
	}
} finally {
	await browser.close();
}
console.log(JSON.stringify(report, null, 2));

async function signIn(page) {
	await page.goto(`${opts.url}/signin`, { waitUntil: 'networkidle2' });
	const email = await page.waitForSelector('input[type="email"], input[name="emailOrLdapLoginId"]');
	await email.type(opts.email);
	await page.type('input[type="password"]', opts.password);
	await page.click('[data-test-id="form-submit-button"]');
	await page
		.waitForFunction(() => !location.pathname.startsWith('/signin'), { timeout: 30_000 })
		.catch(() => undefined);
	if (page.url().includes('/signin')) throw new Error(`sign-in failed at ${page.url()}`);
}

function trackRequests(page) {
	// the editor's API calls (dropdown options, credentials, node parameters); its static files (types/nodes.json
	// never reports finished to puppeteer: waiting on it cost 8 s a node)
	page.on('request', (r) => new URL(r.url()).pathname.startsWith('/rest/') && inflight.set(r, r.url()));
	for (const ev of ['requestfinished', 'requestfailed']) page.on(ev, (r) => inflight.delete(r));
}

/** Wait until the editor stops fetching (credentials, dropdown options from the sidecar): 300 ms without an API
 * call under way, at most 8 s (what is still under way then is logged). */
async function settle(page) {
	const t0 = Date.now();
	let quietSince = t0;
	while (Date.now() - t0 < 8_000) {
		if (inflight.size) quietSince = Date.now();
		else if (Date.now() - quietSince >= 300) break;
		await sleep(50);
	}
	log(`  settled in ${Date.now() - t0} ms${inflight.size ? `; still under way: ${[...inflight.values()].join(', ')}` : ''}`);
}

async function fitView(page) {
	const fit = await page.$('[data-test-id="zoom-to-fit"]');
	if (fit) {
		await fit.click();
		await sleep(600);
	}
}

/** Press "Execute workflow" and wait until the run has ended (a Wait node's webhook included): the toast it shows
 * and each canvas node's status (success, error, or "-" for a node that did not run). */
async function execute(page) {
	const t0 = Date.now();
	await page.$$eval('.el-notification', (els) => els.forEach((e) => e.remove()));
	await page.click('[data-test-id="execute-workflow-button"]');
	const running = '[data-test-id^="stop-execution"]';
	await page.waitForSelector(running, { timeout: 15_000 }).catch(() => undefined);
	await page.waitForFunction((sel) => !document.querySelector(sel), {
		timeout: Number(opts['run-timeout-s']) * 1000,
		polling: 500,
	}, running);
	await page.waitForSelector('.el-notification', { timeout: 15_000 }).catch(() => undefined);
	await sleep(1000);
	const toast = await page.$$eval('.el-notification', (els) => els.map((e) => e.textContent.trim()).join(' | '));
	const nodes = await page.$$eval('[data-test-id="canvas-node"]', (els) =>
		Object.fromEntries(
			els.map((n) => [
				n.getAttribute('data-node-name'),
				n.querySelector('[data-test-id="canvas-node-status-success"]')
					? 'success'
					: n.querySelector('[data-test-id^="canvas-node-status-error"]')
						? 'error'
						: '-',
			]),
		),
	);
	log(`  ran in ${((Date.now() - t0) / 1000).toFixed(1)} s: ${toast}`);
	await page.$$eval('.el-notification', (els) => els.forEach((e) => e.remove()));
	return { toast, nodes, seconds: (Date.now() - t0) / 1000 };
}

/** Open the Logs panel on the first of --output-nodes that ran: the run's result, as a person would look at it. */
async function showOutput(page, execution) {
	const wanted = opts['output-nodes'].split(',').find((n) => execution.nodes[n] === 'success');
	if (!(await page.$('[data-test-id="logs-overview-body"]'))) {
		await page.click('[data-test-id="logs-overview-header"]');
		await sleep(1000);
	}
	if (wanted) {
		const label = await page.evaluateHandle((name) => {
			const body = document.querySelector('[data-test-id="logs-overview-body"]');
			const all = body ? [...body.querySelectorAll('*')] : [];
			return all.find((e) => e.childElementCount === 0 && e.textContent.trim() === name) ?? null;
		}, wanted);
		if (label.asElement()) {
			await label.asElement().click();
			await sleep(1000);
		}
	}
	await fitView(page);
	execution.shown = wanted ?? null;
}

/** The canvas's issue marks (the red triangle of a node), by node name. */
async function canvasIssues(page) {
	return page.$$eval('[data-test-id="canvas-node"]', (nodes) => {
		const out = {};
		for (const n of nodes) {
			if (n.querySelector('[data-test-id="node-issues"]')) {
				const name = n.getAttribute('data-node-name') ?? n.textContent.trim().slice(0, 60);
				out[name] = ['issue mark on the canvas'];
			}
		}
		return out;
	});
}

/** Open a node's settings (the editor's /workflow/ID/NODE_ID route, as a double click does) and read the parameter issues shown there. */
async function ndvIssues(page, workflowId, node) {
	await route(page, `/workflow/${workflowId}/${node.id}`);
	await page.waitForSelector('[data-test-id="ndv"]', { visible: true });
	await settle(page);
	const marks = await page.$$('[data-test-id="ndv"] [data-test-id="parameter-issues"]');
	const found = [];
	for (const mark of marks) {
		const parameter = await mark.evaluate((el) => {
			const holder = el.closest(
				'[data-test-id^="parameter-input-"], [data-test-id="parameter-item"]',
			);
			const label = el.closest('.parameter-item, [class*="parameterItem"]')?.querySelector('label');
			return (
				holder?.getAttribute('data-test-id')?.replace('parameter-input-', '') ??
				label?.textContent?.trim() ??
				'?'
			);
		});
		await mark.hover();
		await sleep(1000);
		const text = await page.evaluate(() =>
			[...document.querySelectorAll('.el-popper, [role="tooltip"]')]
				.filter((t) => t.getClientRects().length && getComputedStyle(t).visibility !== 'hidden')
				.filter((t) => getComputedStyle(t).display !== 'none' && t.textContent.trim())
				.map((t) => t.textContent.trim())
				.join(' | '),
		);
		found.push(`${parameter}: ${text || 'issue mark'}`);
	}
	await route(page, `/workflow/${workflowId}`);
	await page.waitForSelector('[data-test-id="ndv"]', { hidden: true });
	return found;
}

/** Navigate inside the editor (its Vue router), as a click would: no reload of the whole app per node. */
async function route(page, path) {
	await page.evaluate(
		(p) => document.querySelector('#app').__vue_app__.config.globalProperties.$router.push(p),
		path,
	);
}
