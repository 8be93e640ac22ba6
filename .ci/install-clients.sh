#!/usr/bin/env bash
# Install the real container clients the end-to-end tests drive
# (internal/clients): skopeo, podman, runc, containerd/ctr, dockerd and the
# Debian Docker CLI, a static busybox for the test image, and crane; and
# versitygw, the S3 server of the object-store cache tests (internal/s3test);
# and PostgreSQL, the metadata database of replicas (internal/pgtest).
#
# For a fresh Debian 12 (bookworm) machine, as root, with or without systemd.
# Idempotent: a second run installs nothing. Needs Go (>= the go.mod version)
# on PATH for crane. Installing starts no service (policy-rc.d), and nothing
# else is started: each test starts its own daemons.
#
# With CI set, the tests fail (instead of skipping) when a client is missing.
set -euo pipefail

CRANE_VERSION=v0.22.1
VERSITYGW_VERSION=v1.8.0

# Proven on a fresh debootstrap'ed bookworm (minbase): with only these (and
# their Depends: conmon, containers-common, containernetworking-plugins,
# iptables, tini), every internal/clients test passes with CI=true. The
# tests run podman rootful with storage driver vfs and --network none, so
# podman's Recommends (uidmap, slirp4netns, fuse-overlayfs, catatonit,
# netavark/aardvark-dns, buildah) and crun are not needed.
PACKAGES=(
	ca-certificates
	# containers/image clients; podman runs with runc (crun and the systemd
	# cgroup manager fail on these machines; the tests use runc + cgroupfs)
	skopeo
	podman
	conmon
	runc
	# Docker: the daemon and the Debian CLI (/usr/bin/docker); containerd, ctr
	docker.io
	containerd
	iptables
	# a static /bin/busybox for clients.BusyboxImage
	busybox-static
	# peers for registry tests (REFERENCE.md): htpasswd, distribution 2.8
	apache2-utils
	docker-registry
	# the metadata database of replicas (postgres/): internal/pgtest runs
	# its own initdb and postgres; the package's cluster is never started
	postgresql
)

if [[ $(id -u) -ne 0 ]]; then
	echo "install-clients.sh: run as root" >&2
	exit 1
fi

missing=()
for p in "${PACKAGES[@]}"; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
		missing+=("$p")
	fi
done

if ((${#missing[@]} > 0)); then
	echo "install-clients.sh: installing ${missing[*]}"
	# No service may start during the install (docker.io, containerd and
	# docker-registry ship init scripts; on a machine without systemd
	# invoke-rc.d would run them). Keep an existing policy-rc.d.
	policy=/usr/sbin/policy-rc.d
	own_policy=0
	if [[ ! -e $policy ]]; then
		printf '#!/bin/sh\nexit 101\n' >"$policy"
		chmod 0755 "$policy"
		own_policy=1
	fi
	cleanup() { if ((own_policy)); then rm -f "$policy"; fi; }
	trap cleanup EXIT
	export DEBIAN_FRONTEND=noninteractive
	apt-get update
	apt-get install -y --no-install-recommends "${missing[@]}"
	cleanup
	trap - EXIT
fi

# crane, where the tests look for it: PATH, $GOBIN, $GOPATH/bin, ~/go/bin.
if ! command -v go >/dev/null 2>&1; then
	echo "install-clients.sh: go is not on PATH; install Go first (see go.mod)" >&2
	exit 1
fi
gobin=$(go env GOBIN)
if [[ -z $gobin ]]; then
	gobin="$(go env GOPATH | cut -d: -f1)/bin"
fi
if [[ -x $gobin/crane ]] && go version -m "$gobin/crane" 2>/dev/null | grep -q "mod[[:space:]]*github.com/google/go-containerregistry[[:space:]]*${CRANE_VERSION}"; then
	echo "install-clients.sh: crane ${CRANE_VERSION} already in $gobin"
else
	go install "github.com/google/go-containerregistry/cmd/crane@${CRANE_VERSION}"
fi

# versitygw, where internal/s3test looks for it (as crane). Building it
# takes about a minute, so only when the installed one is not this version.
if [[ -x $gobin/versitygw ]] && go version -m "$gobin/versitygw" 2>/dev/null | grep -q "mod[[:space:]]*github.com/versity/versitygw[[:space:]]*${VERSITYGW_VERSION}"; then
	echo "install-clients.sh: versitygw ${VERSITYGW_VERSION} already in $gobin"
else
	go install "github.com/versity/versitygw/cmd/versitygw@${VERSITYGW_VERSION}"
fi

# The busybox in the test image must be static.
if [[ ! -x /bin/busybox ]] || ! { ldd /bin/busybox 2>&1 || true; } | grep -q 'not a dynamic executable'; then
	echo "install-clients.sh: /bin/busybox is missing or dynamically linked (want busybox-static)" >&2
	exit 1
fi

echo "install-clients.sh: versions"
skopeo --version
podman --version
runc --version | head -n1 || true
containerd --version
ctr --version
dockerd --version
/usr/bin/docker --version
"$gobin/crane" version
"$gobin/versitygw" --version
busybox 2>&1 | head -n1 || true
for pg in /usr/lib/postgresql/*/bin/postgres; do "$pg" --version; done
