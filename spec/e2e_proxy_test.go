package spec_test

// Through the proxy: `pullsecret serve` holds the pull secret; the runtimes
// hold only a project pull token. spec pull --via proxy, and the client
// configuration `pullsecret configure` writes for podman (registries.conf
// mirror) and containerd (hosts.toml mirror with the token header).

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pullsecret/pullsecret/internal/clients"
	"github.com/pullsecret/pullsecret/internal/testbin"
	"github.com/pullsecret/pullsecret/spec"
)

// proxyWorld is an e2eWorld with `pullsecret serve` in front of its
// registry (alias "upstream") and a project pull token in a file.
type proxyWorld struct {
	*e2eWorld
	srv       *testbin.Server
	tokenFile string
}

func newProxyWorld(t *testing.T, auth string) *proxyWorld {
	t.Helper()
	w := newE2EWorld(t, auth)
	srv := testbin.Serve(t, w.bin, []string{"PULLSECRET_HOME=" + w.home}, fmt.Sprintf("allow_private_upstreams: true\naliases:\n  upstream: %s\n", w.reg.Addr()))
	r := w.pullsecret("", "token", "create", "--project", "acme", "--scope", "pull", "--ttl", "1h", "--name", "e2e")
	tok := strings.TrimSpace(r.Stdout)
	if !strings.HasPrefix(tok, "pst_") {
		t.Fatalf("token create printed %q", r.Stdout)
	}
	tf := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tf, []byte(tok+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return &proxyWorld{e2eWorld: w, srv: srv, tokenFile: tf}
}

// proxyImage is the image's name on the proxy.
func (w *proxyWorld) proxyImage() string { return w.srv.Host + "/upstream/team/app" }

func (w *proxyWorld) specPullProxy(env []string, args ...string) *spec.Plan {
	w.t.Helper()
	args = append([]string{"--via", "proxy", "--server", w.srv.URL, "--upstream-alias", "upstream"}, args...)
	return w.specPullExpect(env, w.proxyImage()+"@"+w.digest, args...)
}

// The registry must never have seen anything but the proxy: the runtimes
// hold no upstream credential. Checked by the canary greps, and by the
// upstream credential being in no client configuration.

func TestE2ESpecPullViaProxyDocker(t *testing.T) {
	e2eSkip(t)
	t.Parallel()
	clients.Require(t, "dockerd", "docker", "busybox")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	w := newProxyWorld(t, "token")
	d := clients.StartDockerd(t, w.env)
	docker, _ := clients.LookPath("docker")
	// No token given: on the server's machine spec pull mints a short-lived
	// pull token for this repository and revokes it afterwards.
	p := w.specPullProxy([]string{"DOCKER_HOST=" + d.Host, "PULLSECRET_DOCKER=" + docker}, "--runtime", "docker")
	list := w.pullsecret("", "token", "list", "--project", "acme", "-o", "json")
	if !strings.Contains(list.Stdout, `"revoked": "`) && !strings.Contains(list.Stdout, `"revoked":"`) {
		t.Errorf("the minted pull token was not revoked:\n%s", list.Stdout)
	}
	args := []string{"run", "--rm", "--pull", "never", "--network", "none", "--ulimit", "nofile=1024:1024"}
	args = append(args, w.runtimeArgs(p, "-e", func(src, dst string) []string { return []string{"-v", src + ":" + dst + ":ro"} })...)
	args = append(args, p.Runtime.Image, "sh", "-c", inside)
	r, err := d.Docker(ctx, args...)
	w.record(r)
	if err != nil {
		t.Fatalf("docker run: %v\n%s", err, r.Output())
	}
	w.checkInside(r.Stdout)
	r, err = d.Docker(ctx, "image", "inspect", p.Runtime.Image)
	w.record(r)
	if err != nil {
		t.Fatal(err)
	}
	w.noCanary("docker image inspect", r.Stdout)
	w.finalCheck(d.Logs(), w.srv.Logs())
}

func TestE2ESpecPullViaProxyPodmanContainerd(t *testing.T) {
	e2eSkip(t)
	t.Parallel()
	clients.Require(t, "podman", "containerd", "ctr", "busybox")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	w := newProxyWorld(t, "htpasswd")
	tokEnv := []string{"PULLSECRET_TOKEN_FILE=" + w.tokenFile}

	pm := clients.NewPodman(t, w.env)
	p := w.specPullProxy(append(tokEnv, "CONTAINERS_CONF="+pm.ConfFile, "CONTAINERS_STORAGE_CONF="+pm.StorageConf), "--runtime", "podman", "--insecure")
	flags := []string{"--pull", "never"}
	flags = append(flags, w.runtimeArgs(p, "-e", func(src, dst string) []string { return []string{"-v", src + ":" + dst + ":ro"} })...)
	r, err := pm.RunContainerWith(ctx, flags, p.Runtime.Image, "sh", "-c", inside)
	w.record(r)
	if err != nil {
		t.Fatalf("podman run: %v\n%s", err, r.Output())
	}
	w.checkInside(r.Stdout)

	c := clients.StartContainerd(t)
	ctr, _ := clients.LookPath("ctr")
	w.specPullProxy(append(tokEnv, "CONTAINERD_ADDRESS="+c.Address, "CONTAINERD_NAMESPACE=default", "CONTAINERD_SNAPSHOTTER=native", "PULLSECRET_CTR="+ctr), "--runtime", "containerd")
	r, err = c.Ctr(ctx, "images", "ls")
	w.record(r)
	if err != nil || !strings.Contains(r.Stdout, w.proxyImage()+":v1") || !strings.Contains(r.Stdout, w.digest) {
		t.Fatalf("ctr images ls: %v\n%s", err, r.Output())
	}
	w.finalCheck(c.Logs(), w.srv.Logs())
}

// TestE2EConfigureMirrors: the configuration `pullsecret configure` writes
// for podman (registries.conf mirror, helper for the proxy host) and
// containerd (hosts.toml with the token header) pulls the upstream image
// through the proxy. Neither client holds the upstream credential: a pull
// that did not go through the proxy would be turned away.
func TestE2EConfigureMirrors(t *testing.T) {
	e2eSkip(t)
	t.Parallel()
	clients.Require(t, "podman", "containerd", "ctr", "busybox")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	w := newProxyWorld(t, "token")
	tok, err := os.ReadFile(w.tokenFile)
	if err != nil {
		t.Fatal(err)
	}

	// containerd: hosts.toml for the upstream, the proxy as its mirror.
	hostsDir := t.TempDir()
	w.pullsecret("", "configure", "containerd", "--hosts-dir", hostsDir, "--proxy", w.srv.URL, "--upstream", w.reg.Addr(), "--token-file", w.tokenFile)
	c := clients.StartContainerd(t)
	r, err := c.Ctr(ctx, "images", "pull", "--hosts-dir", hostsDir, w.ref)
	w.record(r)
	if err != nil {
		t.Fatalf("ctr pull through the configured mirror: %v\n%s", err, r.Output())
	}
	r, _ = c.Ctr(ctx, "images", "ls")
	if !strings.Contains(r.Stdout, w.digest) {
		t.Errorf("ctr images ls:\n%s", r.Stdout)
	}

	// podman: the mirror in registries.conf, our helper for the proxy host in
	// remote mode with the pull token (it answers the proxy's own host with
	// the token; it has no upstream credential to give).
	penv := clients.NewEnv(t, clients.WithHelperDir(w.bin), clients.WithEnv(
		"PULLSECRET_SERVER="+w.srv.URL, "PULLSECRET_TOKEN="+strings.TrimSpace(string(tok)), "PULLSECRET_HOME="+t.TempDir()))
	cfg := clients.Command{Path: filepath.Join(w.bin, "pullsecret"), Args: []string{"configure", "podman", "--auth-file", penv.AuthFile(),
		"--registries-conf", penv.RegistriesConf(), "--registry", w.reg.Addr() + "=upstream", "--proxy", w.srv.Host, "--insecure"}}
	r, err = penv.Exec(ctx, cfg)
	w.record(r)
	if err != nil {
		t.Fatalf("configure podman: %v\n%s", err, r.Output())
	}
	pm := clients.NewPodman(t, penv)
	r, err = pm.Podman(ctx, "pull", w.ref)
	w.record(r)
	if err != nil {
		t.Fatalf("podman pull through the configured mirror: %v\n%s", err, r.Output())
	}
	r, err = pm.Podman(ctx, "image", "inspect", "--format", "{{.Digest}}", w.ref)
	if err != nil || strings.TrimSpace(r.Stdout) != w.digest {
		t.Errorf("podman image digest %q (%v)", r.Stdout, err)
	}
	w.finalCheck(c.Logs(), w.srv.Logs())
}
