package spec

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/pullsecret/pullsecret/internal/testbin"
	"github.com/pullsecret/pullsecret/registry"
	"github.com/pullsecret/pullsecret/secret"
)

// pullWorld is a private registry holding team/app:v1 (the canary is its
// password), a store whose project acme has the pull secret "team" for it,
// and a spec naming that secret.
type pullWorld struct {
	reg    *registry.Registry
	store  *secret.Store
	digest string
	spec   string
}

func newPullWorld(t *testing.T, auth string) *pullWorld {
	t.Helper()
	ctx := context.Background()
	users := map[string]string{"bot": canary}
	opt := registry.WithHTPasswd(users)
	if auth == "token" {
		opt = registry.WithTokenAuth(users)
	}
	reg, err := registry.Start(ctx, opt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	img, err := reg.SeedRandom(ctx, "team/app", "v1")
	if err != nil {
		t.Fatal(err)
	}
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	store, err := secret.Open(filepath.Join(t.TempDir(), "home"))
	if err != nil {
		t.Fatal(err)
	}
	p, _ := secret.ParsePattern(reg.Addr() + "/team")
	if _, err := store.Create(ctx, secret.Secret{Project: "acme", Name: "team", Kind: secret.Basic, Registries: []secret.Pattern{p}},
		secret.Value{Username: "bot", Password: canary}); err != nil {
		t.Fatal(err)
	}
	return &pullWorld{reg: reg, store: store, digest: d.String(),
		spec: head + "container:\n  image: " + reg.Ref("team/app", "v1") + "\n  pull_secret: team\n  secrets: [app-keys]\n"}
}

func (w *pullWorld) plan(t *testing.T) *Plan {
	t.Helper()
	p, err := plan(t, w.store, w.spec, Options{})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// emptyDir fails unless dir holds nothing: every temporary file is gone.
func emptyDir(t *testing.T, dir string) {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		t.Errorf("left behind in the temporary folder: %s", e.Name())
	}
}

func noCanary(t *testing.T, what, s string) {
	t.Helper()
	for _, f := range []string{canary, base64.StdEncoding.EncodeToString([]byte("bot:" + canary))} {
		if strings.Contains(s, f) {
			t.Errorf("%s holds the pull secret's value: %s", what, s)
		}
	}
}

func TestPullOCILayout(t *testing.T) {
	t.Parallel()
	for _, auth := range []string{"htpasswd", "token"} {
		t.Run(auth, func(t *testing.T) {
			t.Parallel()
			w := newPullWorld(t, auth)
			p := w.plan(t)
			tmp := t.TempDir()
			dir := filepath.Join(t.TempDir(), "layout")
			var progress strings.Builder
			err := Pull(context.Background(), p, PullOptions{Runtime: Runtime{Kind: RuntimeOCILayout, Dir: dir}, Store: w.store, TempDir: tmp, Progress: &progress})
			if err != nil {
				t.Fatal(err)
			}
			if !p.Runtime.Pinned || p.Runtime.Digest != w.digest || p.Runtime.Image != w.reg.Addr()+"/team/app@"+w.digest {
				t.Errorf("runtime plan not pinned to %s: %+v", w.digest, p.Runtime)
			}
			lp, err := layout.FromPath(dir)
			if err != nil {
				t.Fatal(err)
			}
			idx, err := lp.ImageIndex()
			if err != nil {
				t.Fatal(err)
			}
			m, err := idx.IndexManifest()
			if err != nil {
				t.Fatal(err)
			}
			if len(m.Manifests) != 1 || m.Manifests[0].Digest.String() != w.digest {
				t.Errorf("layout index: %+v", m.Manifests)
			}
			emptyDir(t, tmp)
			b, _ := json.Marshal(p)
			noCanary(t, "the plan", string(b)+progress.String())
		})
	}
}

func TestPullErrorsCleanUp(t *testing.T) {
	t.Parallel()
	w := newPullWorld(t, "token")
	ctx := context.Background()
	// The password changes after the secret was stored: the pull fails.
	if err := w.reg.SetPassword("bot", "another-password"); err != nil {
		t.Fatal(err)
	}
	for _, rt := range []Runtime{{Kind: RuntimeOCILayout, Dir: filepath.Join(t.TempDir(), "l")}, {Kind: RuntimeContainerd}} {
		p := w.plan(t)
		tmp := t.TempDir()
		err := Pull(ctx, p, PullOptions{Runtime: rt, Store: w.store, TempDir: tmp, Env: []string{"PATH=/nonexistent"}})
		if err == nil {
			t.Fatalf("%s: a pull with a wrong password succeeded", rt)
		}
		noCanary(t, "the error", err.Error())
		emptyDir(t, tmp)
		if p.Runtime.Pinned {
			t.Errorf("%s: a failed pull pinned the plan", rt)
		}
	}
}

// fakeRuntime writes a shell script standing in for docker, podman or ctr.
// It records what the real one would see (its config, the helper's answer,
// the hosts.toml and its mode) into rec, then reports digest.
func fakeRuntime(t *testing.T, kind, rec, ref, digest string) string {
	t.Helper()
	var body string
	switch kind {
	case "docker", "podman":
		cfgVar := `"$DOCKER_CONFIG/config.json"`
		if kind == "podman" {
			cfgVar = `"$REGISTRY_AUTH_FILE"`
		}
		body = fmt.Sprintf(`
case "$1" in
pull)
  cp %[1]s %[2]q/config.json
  stat -c %%a %[1]s > %[2]q/config.mode
  echo "$PULLSECRET_PROJECT" > %[2]q/project
  echo "$@" > %[2]q/args
  # What the runtime does with credHelpers: ask the helper on PATH.
  host=$(echo %[3]q | cut -d/ -f1)
  echo "$host" | docker-credential-pullsecret get > %[2]q/helper.json
  ;;
image)
  if [ %[4]q = docker ]; then echo '["%[6]s@%[5]s"]'; else echo %[5]s; fi
  ;;
esac
`, cfgVar, rec, ref, kind, digest, strings.TrimSuffix(ref, ":v1"))
	case "ctr":
		body = fmt.Sprintf(`
case "$2" in
pull)
  dir="$4"
  f=$(ls "$dir"/*/hosts.toml)
  cp "$f" %[1]q/hosts.toml
  stat -c %%a "$f" > %[1]q/hosts.mode
  echo "$@" > %[1]q/args
  ;;
ls)
  echo "REF TYPE DIGEST SIZE PLATFORMS LABELS"
  echo %[2]q application/vnd.oci.image.manifest.v1+json %[3]s 1.0MiB linux/amd64 -
  ;;
esac
`, rec, ref, digest)
	}
	path := filepath.Join(t.TempDir(), kind)
	if err := os.WriteFile(path, []byte("#!/bin/sh\nset -e\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
	return path
}

func readRec(t *testing.T, rec, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(rec, name))
	if err != nil {
		t.Fatalf("the fake runtime recorded no %s: %v", name, err)
	}
	return strings.TrimSpace(string(b))
}

func TestPullDockerPodmanHandTheHelper(t *testing.T) {
	t.Parallel()
	bin := testbin.Build(t, "docker-credential-pullsecret")
	w := newPullWorld(t, "htpasswd")
	ref := w.reg.Ref("team/app", "v1")
	for _, kind := range []string{"docker", "podman"} {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			rec := t.TempDir()
			prog := fakeRuntime(t, kind, rec, ref, w.digest)
			tmp := t.TempDir()
			p := w.plan(t)
			env := []string{"PATH=/usr/bin:/bin", "PULLSECRET_HOME=" + w.store.Home(), "PULLSECRET_DOCKER=" + prog, "PULLSECRET_PODMAN=" + prog}
			err := Pull(context.Background(), p, PullOptions{Runtime: Runtime{Kind: kind}, Store: w.store, TempDir: tmp, Env: env, HelperDir: bin, Insecure: true})
			if err != nil {
				t.Fatal(err)
			}
			if p.Runtime.Digest != w.digest {
				t.Errorf("pinned to %q, want %s", p.Runtime.Digest, w.digest)
			}
			var cfg struct {
				Auths       map[string]any    `json:"auths"`
				CredHelpers map[string]string `json:"credHelpers"`
			}
			raw := readRec(t, rec, "config.json")
			if err := json.Unmarshal([]byte(raw), &cfg); err != nil {
				t.Fatal(err)
			}
			if cfg.CredHelpers[w.reg.Addr()] != "pullsecret" || len(cfg.Auths) != 0 {
				t.Errorf("client config: %s", raw)
			}
			noCanary(t, "the client config", raw)
			if m := readRec(t, rec, "config.mode"); m != "600" {
				t.Errorf("client config mode %s", m)
			}
			if pr := readRec(t, rec, "project"); pr != "acme" {
				t.Errorf("helper project %q", pr)
			}
			var got struct{ Username, Secret string }
			if err := json.Unmarshal([]byte(readRec(t, rec, "helper.json")), &got); err != nil || got.Username != "bot" || got.Secret != canary {
				t.Errorf("the helper the runtime calls did not resolve the pull secret: %+v %v", got.Username, err)
			}
			if kind == "podman" && !strings.Contains(readRec(t, rec, "args"), "--tls-verify=false") {
				t.Errorf("podman args: %s", readRec(t, rec, "args"))
			}
			emptyDir(t, tmp)
		})
	}
}

func TestPullContainerdHostsTOML(t *testing.T) {
	t.Parallel()
	for _, auth := range []string{"htpasswd", "token"} {
		t.Run(auth, func(t *testing.T) {
			t.Parallel()
			w := newPullWorld(t, auth)
			ref := w.reg.Ref("team/app", "v1")
			rec := t.TempDir()
			prog := fakeRuntime(t, "ctr", rec, ref, w.digest)
			tmp := t.TempDir()
			p := w.plan(t)
			err := Pull(context.Background(), p, PullOptions{Runtime: Runtime{Kind: RuntimeContainerd}, Store: w.store, TempDir: tmp,
				Env: []string{"PATH=/usr/bin:/bin", "PULLSECRET_CTR=" + prog}})
			if err != nil {
				t.Fatal(err)
			}
			if p.Runtime.Digest != w.digest {
				t.Errorf("pinned to %q", p.Runtime.Digest)
			}
			toml := readRec(t, rec, "hosts.toml")
			server := "http://" + w.reg.Addr()
			for _, want := range []string{`server = "` + server + `"`, `[host."` + server + `"]`, `capabilities = ["pull", "resolve"]`, `Authorization = [`} {
				if !strings.Contains(toml, want) {
					t.Errorf("hosts.toml lacks %q:\n%s", want, toml)
				}
			}
			if auth == "token" {
				// A registry bearer token for this repository, not the password.
				if !strings.Contains(toml, `Authorization = ["Bearer `) {
					t.Errorf("hosts.toml header is not a bearer token:\n%s", toml)
				}
				noCanary(t, "hosts.toml", toml)
			} else if !strings.Contains(toml, `Authorization = ["Basic `) {
				t.Errorf("hosts.toml header:\n%s", toml)
			}
			if m := readRec(t, rec, "hosts.mode"); m != "600" {
				t.Errorf("hosts.toml mode %s", m)
			}
			if args := readRec(t, rec, "args"); !strings.HasSuffix(args, ref) || strings.Contains(args, "--user") {
				t.Errorf("ctr args: %s", args)
			}
			emptyDir(t, tmp)
		})
	}
}

func TestPullHostOnlyAmbiguity(t *testing.T) {
	t.Parallel()
	w := newPullWorld(t, "htpasswd")
	// A second secret for another part of the same registry: Docker and
	// podman name only the host, and the helper cannot choose.
	pat, _ := secret.ParsePattern(w.reg.Addr() + "/other")
	if _, err := w.store.Create(context.Background(), secret.Secret{Project: "acme", Name: "other", Kind: secret.Basic, Registries: []secret.Pattern{pat}},
		secret.Value{Username: "x", Password: "y"}); err != nil {
		t.Fatal(err)
	}
	p := w.plan(t)
	tmp := t.TempDir()
	err := Pull(context.Background(), p, PullOptions{Runtime: Runtime{Kind: RuntimeDocker}, Store: w.store, TempDir: tmp, Env: []string{"PATH=/nonexistent"}})
	if err == nil || !strings.Contains(err.Error(), "secrets other, team each cover part of") {
		t.Errorf("want an ambiguity error, got %v", err)
	}
	emptyDir(t, tmp)
	// containerd and oci-layout resolve the named secret themselves.
	if err := Pull(context.Background(), w.plan(t), PullOptions{Runtime: Runtime{Kind: RuntimeOCILayout, Dir: filepath.Join(t.TempDir(), "l")}, Store: w.store, TempDir: tmp}); err != nil {
		t.Errorf("oci-layout: %v", err)
	}
}

func TestParseRuntime(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		in   string
		want Runtime
		ok   bool
	}{
		{"docker", Runtime{Kind: "docker"}, true},
		{"podman", Runtime{Kind: "podman"}, true},
		{"containerd", Runtime{Kind: "containerd"}, true},
		{"oci-layout:/tmp/x", Runtime{Kind: "oci-layout", Dir: "/tmp/x"}, true},
		{"oci-layout:", Runtime{}, false},
		{"oci-layout", Runtime{}, false},
		{"cri-o", Runtime{}, false},
	} {
		got, err := ParseRuntime(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("ParseRuntime(%q) = %+v, %v", tc.in, got, err)
		}
	}
}
