package main

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/pullsecret/pullsecret/registry"
	"github.com/pullsecret/pullsecret/secret"
)

// TestDemo runs `pullsecret demo` (make run) in-process.
func TestDemo(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	r := e.run("", "demo")
	if r.code != 0 {
		t.Fatalf("demo: exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	for _, want := range []string{"every digest verified", "docker pull", "hosts.toml", "project \"other\" is refused"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("demo output lacks %q:\n%s", want, r.stdout)
		}
	}
	if strings.Contains(r.stdout+r.stderr, "demo-upstream-pw-") {
		t.Fatal("the demo printed the upstream password")
	}
	if _, err := os.Stat(e.home); err == nil {
		t.Error("the demo touched $PULLSECRET_HOME")
	}
}

// TestServe runs `pullsecret serve --config FILE` in-process, pulls
// through it and shuts it down with the context (SIGINT in main).
func TestServe(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	up, err := registry.Start(context.Background(), registry.WithHTPasswd(map[string]string{"bot": canary}))
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	img, err := up.SeedRandom(context.Background(), "team/app", "v1")
	if err != nil {
		t.Fatal(err)
	}
	p, _ := secret.ParsePattern(up.Host())
	if _, err := e.store().Create(context.Background(), secret.Secret{Project: "acme", Name: "up", Kind: secret.Basic, Registries: []secret.Pattern{p}},
		secret.Value{Username: "bot", Password: canary}); err != nil {
		t.Fatal(err)
	}
	tok := strings.TrimSpace(e.must("", "token", "create", "--project", "acme"))

	cfgFile := filepath.Join(t.TempDir(), "config.yaml")
	os.WriteFile(cfgFile, []byte("listen: 127.0.0.1:1\nallow_private_upstreams: [127.0.0.1]\naliases: {up: "+up.Host()+"}\nlog: {format: json}\n"), 0o600)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var stderr syncWriter
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, []string{"serve", "--config", cfgFile, "--listen", "127.0.0.1:0"}, nil, io.Discard, &stderr, e.getenv)
	}()
	var url string
	for deadline := time.Now().Add(10 * time.Second); url == "" && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		for _, line := range strings.Split(stderr.String(), "\n") {
			var l struct {
				Msg string `json:"msg"`
				URL string `json:"url"`
			}
			if json.Unmarshal([]byte(line), &l) == nil && l.Msg == "serving" {
				url = l.URL
			}
		}
	}
	if url == "" {
		t.Fatalf("serve did not start:\n%s", stderr.String())
	}
	ref, _ := name.ParseReference(strings.TrimPrefix(url, "http://")+"/up/team/app:v1", name.Insecure)
	got, err := remote.Image(ref, remote.WithAuth(&authn.Basic{Username: "x", Password: tok}))
	if err != nil {
		t.Fatalf("pull through serve: %v", err)
	}
	gd, _ := got.Digest()
	wd, _ := img.Digest()
	if gd != wd {
		t.Fatalf("digest %s, want %s", gd, wd)
	}
	for _, path := range []string{"/healthz", "/readyz", "/metrics"} {
		resp, err := http.Get(url + path)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("%s: %v %v", path, err, resp)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if strings.Contains(string(b), canary) {
			t.Fatalf("%s shows the upstream password", path)
		}
	}
	cancel()
	select {
	case code := <-done:
		if code != 0 {
			t.Fatalf("serve exited %d:\n%s", code, stderr.String())
		}
	case <-time.After(15 * time.Second):
		t.Fatal("serve did not shut down")
	}
	logs := stderr.String()
	if strings.Contains(logs, canary) || strings.Contains(logs, tok) {
		t.Fatalf("a credential reached the log:\n%s", logs)
	}
	if !strings.Contains(logs, `"project":"acme"`) || !strings.Contains(logs, `"upstream":"`+up.Host()+`"`) {
		t.Errorf("request log lacks project or upstream:\n%s", logs)
	}
}

func TestServeBadInput(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	cfgFile := filepath.Join(t.TempDir(), "config.yaml")
	os.WriteFile(cfgFile, []byte("listen: 127.0.0.1:0\nmax_manifest_sise: 4MiB\n"), 0o600)
	r := e.run("", "serve", "--config", cfgFile)
	if r.code != 1 || !strings.Contains(r.stderr, "max_manifest_sise") {
		t.Errorf("unknown key: exit %d %q", r.code, r.stderr)
	}
	r = e.run("", "serve", "--allow-private-upstreams", "not a host!")
	if r.code != 2 {
		t.Errorf("bad flag value: exit %d %q", r.code, r.stderr)
	}
	r = e.run("", "serve", "--tls-cert", "x.pem")
	if r.code != 1 || !strings.Contains(r.stderr, "tls_key") {
		t.Errorf("cert without key: exit %d %q", r.code, r.stderr)
	}
	r = e.run("", "serve", "--config", filepath.Join(t.TempDir(), "missing.yaml"))
	if r.code != 1 {
		t.Errorf("missing config: exit %d %q", r.code, r.stderr)
	}
	r = e.run("", "serve", "--advertise", "http://10.0.0.5:5080")
	if r.code != 2 || !strings.Contains(r.stderr, "no cluster section") {
		t.Errorf("--advertise without a cluster: exit %d %q", r.code, r.stderr)
	}
	os.WriteFile(cfgFile, []byte("metadata: {driver: postgres, dsn: 'postgres://u@127.0.0.1:1/p'}\ncluster: {secret_file: /nonexistent}\n"), 0o600)
	r = e.run("", "serve", "--config", cfgFile)
	if r.code != 1 || !strings.Contains(r.stderr, "cluster.advertise: required") {
		t.Errorf("cluster without advertise: exit %d %q", r.code, r.stderr)
	}
	r = e.run("", "serve", "--config", cfgFile, "--advertise", "10.0.0.5:5080")
	if r.code != 1 || !strings.Contains(r.stderr, "not an http(s) base URL") {
		t.Errorf("--advertise without a scheme: exit %d %q", r.code, r.stderr)
	}
}
