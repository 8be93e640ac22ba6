#!/bin/sh
# stage.sh BIN CONTEXT: lay out the build context of deploy/image/Containerfile
# in CONTEXT (an empty folder) from the static binaries in BIN (make build).
set -eu
bin=$1
ctx=$2
ca=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
for f in pullsecret docker-credential-pullsecret pullsecret-credential-provider; do
	[ -x "$bin/$f" ] || { echo "stage.sh: $bin/$f missing: run make build" >&2; exit 1; }
done
# Upstream registries are HTTPS: without roots no pull works.
[ -s "$ca" ] || { echo "stage.sh: no CA bundle at $ca (apt-get install -y ca-certificates, or set CA_BUNDLE)" >&2; exit 1; }
mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/etc/ssl/certs" "$ctx/rootfs/tmp" "$ctx/home"
cp "$bin/pullsecret" "$bin/docker-credential-pullsecret" "$bin/pullsecret-credential-provider" "$ctx/rootfs/usr/local/bin/"
cp "$ca" "$ctx/rootfs/etc/ssl/certs/ca-certificates.crt"
chmod 0644 "$ctx/rootfs/etc/ssl/certs/ca-certificates.crt"
chmod 1777 "$ctx/rootfs/tmp"
# A name for UID 65532: the audit trail names the user who runs an admin
# command (kubectl exec ... pullsecret cache warm).
printf 'root:x:0:0:root:/root:/sbin/nologin\npullsecret:x:65532:65532:pullsecret:/var/lib/pullsecret:/sbin/nologin\n' > "$ctx/rootfs/etc/passwd"
printf 'root:x:0:\npullsecret:x:65532:\n' > "$ctx/rootfs/etc/group"
