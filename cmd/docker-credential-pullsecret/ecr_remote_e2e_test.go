package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pullsecret/pullsecret/internal/clients"
	"github.com/pullsecret/pullsecret/internal/testbin"
	"github.com/pullsecret/pullsecret/registry"
)

// The same pulls as TestE2EECRClients, with the ecr secret held by
// `pullsecret serve`: crane, skopeo and dockerd through the helper in remote
// mode (the client machine has a project token and no AWS credential), and
// crane and dockerd through the proxy (PROXY/<alias>/<repo>), where the
// server exchanges the secret for an ECR token itself.
func TestE2EECRRemoteAndProxy(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end with real clients; not in -short")
	}
	t.Parallel()
	clients.Require(t, "crane", "skopeo")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	w := newECRWorld(t)
	reg, err := registry.StartECR(ctx, w.fake)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	img, err := clients.BusyboxImage()
	if err != nil {
		t.Fatal(err)
	}
	if err := reg.SeedImage(ctx, "team/app", "v1", img); err != nil {
		t.Fatal(err)
	}
	ref := reg.Ref("team/app", "v1")

	var (
		mu      sync.Mutex
		results []clients.Result
	)
	record := func(r clients.Result) {
		mu.Lock()
		defer mu.Unlock()
		results = append(results, r)
	}

	// The server's machine: the store, the AWS endpoints of the fake.
	var serverVars []string
	for _, kv := range w.env {
		if strings.HasPrefix(kv, "PULLSECRET_") || strings.HasPrefix(kv, "AWS_") {
			serverVars = append(serverVars, kv)
		}
	}
	admin := clients.NewEnv(t, clients.WithEnv(serverVars...))
	ps := func(stdin string, args ...string) clients.Result {
		t.Helper()
		c := clients.Command{Path: filepath.Join(w.bin, "pullsecret"), Args: args}
		if stdin != "" {
			c.Stdin = []byte(stdin)
		}
		r, err := admin.Exec(ctx, c)
		record(r)
		if err != nil {
			t.Fatalf("pullsecret %s: %v\n%s", strings.Join(args, " "), err, r.Output())
		}
		return r
	}
	ps(canaryKey+"\n", "secret", "create", "ecr-mirror", "--project", "acme", "--ecr", "--registry", reg.Addr(),
		"--aws-region", "us-east-1", "--aws-access-key-id", keyID, "--aws-secret-access-key-stdin")
	tok := strings.TrimSpace(ps("", "token", "create", "--project", "acme", "--scope", "credentials", "--scope", "pull",
		"--ttl", "1h", "--name", "e2e-ecr").Stdout)
	if !strings.HasPrefix(tok, "pst_") {
		t.Fatalf("token create printed %q", tok)
	}
	srv := testbin.Serve(t, w.bin, w.env,
		fmt.Sprintf("allow_private_upstreams: [127.0.0.1/32]\naliases:\n  ecr: %s\n", reg.Addr()))
	proxyRef := srv.Host + "/ecr/team/app:v1"

	// The client machine: a project token, the helper in remote mode, no
	// AWS credential and no store of its own.
	remote := clients.NewEnv(t, clients.WithHelperDir(w.bin), clients.WithEnv(
		"PULLSECRET_SERVER="+srv.URL, "PULLSECRET_TOKEN="+tok, "PULLSECRET_HOME="+filepath.Join(t.TempDir(), "client-home"),
		"AWS_EC2_METADATA_DISABLED=true"))
	remote.CredHelper(reg.Addr(), "pullsecret")
	remote.CredHelper(srv.Host, "pullsecret") // the proxy: the helper answers the token itself
	// A client that logged in to the proxy with the token (docker login).
	login := clients.NewEnv(t)
	login.Login(srv.Host, "ci", tok)

	pull := func(what string, f func() (clients.Result, error)) {
		t.Helper()
		start := time.Now()
		r, err := f()
		record(r)
		if err != nil {
			t.Fatalf("%s: %v\n%s\nserver log:\n%s", what, err, r.Output(), srv.Logs())
		}
		t.Logf("%s: ok in %s", what, time.Since(start).Round(time.Millisecond))
	}
	pull("crane, remote-mode helper", func() (clients.Result, error) {
		return remote.Crane(ctx, "pull", "--insecure", "--format", "oci", ref, filepath.Join(t.TempDir(), "crane-remote"))
	})
	pull("skopeo, remote-mode helper", func() (clients.Result, error) {
		return remote.Skopeo(ctx, "copy", "--authfile", remote.AuthFile(), "--src-tls-verify=false",
			"docker://"+ref, "dir:"+filepath.Join(t.TempDir(), "skopeo-remote"))
	})
	if n := w.fake.Calls(registry.APIGetAuthorizationToken); n != 1 {
		t.Errorf("%d GetAuthorizationToken calls for two remote-mode pulls, want 1 (server cache)", n)
	}
	pull("crane, proxy with docker login", func() (clients.Result, error) {
		return login.Crane(ctx, "pull", "--insecure", "--format", "oci", proxyRef, filepath.Join(t.TempDir(), "crane-proxy-login"))
	})
	pull("crane, proxy with the remote-mode helper", func() (clients.Result, error) {
		return remote.Crane(ctx, "pull", "--insecure", "--format", "oci", proxyRef, filepath.Join(t.TempDir(), "crane-proxy-helper"))
	})
	pull("skopeo, proxy with the remote-mode helper", func() (clients.Result, error) {
		return remote.Skopeo(ctx, "copy", "--authfile", remote.AuthFile(), "--src-tls-verify=false",
			"docker://"+proxyRef, "dir:"+filepath.Join(t.TempDir(), "skopeo-proxy-helper"))
	})
	// A proxy client without the token is turned away.
	anon := clients.NewEnv(t)
	r, err := anon.Crane(ctx, "pull", "--insecure", "--format", "oci", proxyRef, filepath.Join(t.TempDir(), "crane-anon"))
	record(r)
	if err == nil {
		t.Errorf("crane pulled through the proxy without a token")
	}

	var dockerLogs string
	t.Run("docker", func(t *testing.T) {
		d := clients.StartDockerd(t, remote) // skips where dockerd cannot run
		defer func() { dockerLogs = d.Logs() }()
		run := func(env *clients.Env, args ...string) clients.Result {
			t.Helper()
			start := time.Now()
			r, err := d.DockerAs(ctx, env, args...)
			record(r)
			if err != nil {
				t.Fatalf("docker %s: %v\n%s\nserver log:\n%s", strings.Join(args, " "), err, r.Output(), srv.Logs())
			}
			t.Logf("docker %s: ok in %s", strings.Join(args, " "), time.Since(start).Round(time.Millisecond))
			return r
		}
		run(remote, "pull", ref)
		if r := run(remote, "run", "--rm", "--network", "none", "--ulimit", "nofile=1024:1024", ref, "sh", "-c", "echo ran-ok"); !strings.Contains(r.Stdout, "ran-ok") {
			t.Fatalf("docker run (remote-mode pull): %s", r.Output())
		}
		run(login, "pull", proxyRef)
		if r := run(login, "run", "--rm", "--network", "none", "--ulimit", "nofile=1024:1024", proxyRef, "sh", "-c", "echo ran-ok"); !strings.Contains(r.Stdout, "ran-ok") {
			t.Fatalf("docker run (proxy pull): %s", r.Output())
		}
		run(remote, "rmi", proxyRef)
		run(remote, "pull", proxyRef) // the proxy through the remote-mode helper
	})

	// Canaries: the AWS secret key and every ECR password issued, in the
	// clear or base64 as in a Basic header or an ECR token, are in no
	// output, log, metrics or file in the clear.
	issued := w.fake.Issued()
	if len(issued) == 0 {
		t.Fatal("the fake ECR issued no password")
	}
	var canaries []string
	for _, c := range append([]string{canaryKey}, issued...) {
		canaries = append(canaries, c, base64.StdEncoding.EncodeToString([]byte("AWS:"+c)), base64.StdEncoding.EncodeToString([]byte(c)))
	}
	canaries = append(canaries, "fake-ecr-") // the prefix of every password the fake issues
	check := func(what, s string) {
		t.Helper()
		for _, c := range canaries {
			if strings.Contains(s, c) {
				t.Errorf("canary %.12q… in %s", c, what)
			}
		}
	}
	resp, err := http.Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	metrics, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(metrics), "pullsecret_") {
		t.Errorf("no pullsecret metrics at /metrics:\n%.500s", metrics)
	}
	check("the metrics", string(metrics))
	if !strings.Contains(srv.Logs(), "team/app") {
		t.Errorf("the server logged no request for team/app:\n%.2000s", srv.Logs())
	}
	check("the server log", srv.Logs())
	check("dockerd's log", dockerLogs)
	mu.Lock()
	for _, r := range results {
		check("the output of "+r.Cmd, r.Output())
	}
	mu.Unlock()
	for _, root := range []string{admin.Dir(), remote.Dir(), login.Dir(), anon.Dir(), w.home} {
		filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
			if err != nil || !d.Type().IsRegular() {
				return nil
			}
			if fi, err := d.Info(); err != nil || fi.Size() > 8<<20 {
				return nil
			}
			b, _ := os.ReadFile(path)
			check(path, string(b))
			if strings.HasPrefix(path, w.home) && bytes.Contains(b, []byte(keyID)) {
				t.Errorf("%s holds the AWS key id in the clear", path)
			}
			return nil
		})
	}
	if n := w.fake.Calls(registry.APIGetAuthorizationToken); n != 1 {
		t.Errorf("%d GetAuthorizationToken calls in all, want 1 (server cache)", n)
	}
}
