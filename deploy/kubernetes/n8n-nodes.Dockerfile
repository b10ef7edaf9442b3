# The community package for n8n.yaml's init container: package.json and dist/ as npm installs them.
#   make n8n-nodes && docker build -f deploy/kubernetes/n8n-nodes.Dockerfile -t <registry>/model-orchestrator/n8n-nodes:0.1.0 .
FROM busybox:1.37
COPY n8n-nodes/package.json /package/package.json
COPY n8n-nodes/dist /package/dist
USER 1000:1000
