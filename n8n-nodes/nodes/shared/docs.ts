/**
 * Where the nodes' and the credential's "Docs" links go: a section of this package's README in the repository
 * (the package is not on the npm registry, so n8n's default, the npm page, would be a 404). The repository URL is
 * package.json's `repository` (its one owner); the section anchors are the README's headings.
 */
import { repository } from '../../package.json';

const README_PATH = 'blob/main/n8n-nodes/README.md';

/** `https://github.com/<owner>/<repo>/blob/main/n8n-nodes/README.md#<anchor>` */
export function readmeUrl(anchor: string): string {
	const repo = repository.url.replace(/^git\+/, '').replace(/\.git$/, '');
	return `${repo}/${README_PATH}#${anchor}`;
}
