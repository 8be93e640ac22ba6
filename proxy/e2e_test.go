package proxy_test

// End to end: `pullsecret serve` as a real process in front of a private
// htpasswd upstream whose password is a canary. Real clients (crane, skopeo,
// podman, dockerd, containerd) pull through it holding only a project token;
// crane pushes through it with a push token; a pull-only token cannot push
// and a revoked token is turned away at once. The canary appears in no log,
// client output, metric or file.

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
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

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/pullsecret/pullsecret/internal/clients"
	"github.com/pullsecret/pullsecret/internal/testbin"
	"github.com/pullsecret/pullsecret/registry"
)

// e2eCanary is the upstream password: the project's pull secret.
const e2eCanary = "canary-upstream-pw-e2e-7f31c9a4"

// e2eWorld is the upstream, the pullsecret home holding its pull secret,
// the running server and everything any client printed.
type e2eWorld struct {
	t      *testing.T
	bin    string
	home   string
	reg    *registry.Registry
	admin  *clients.Env // runs the pullsecret CLI on home
	srv    *testbin.Server
	digest string // of up/team/app:v1

	mu     sync.Mutex
	output []string
	dirs   []string // client environment folders, grepped at the end
}

func (w *e2eWorld) record(r clients.Result) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.output = append(w.output, r.Cmd, r.Stdout, r.Stderr)
}

func (w *e2eWorld) newEnv(opts ...clients.Option) *clients.Env {
	env := clients.NewEnv(w.t, opts...)
	w.mu.Lock()
	w.dirs = append(w.dirs, env.Dir(), env.Home(), env.DockerConfigDir(), filepath.Dir(env.AuthFile()))
	w.mu.Unlock()
	return env
}

func (w *e2eWorld) pullsecret(stdin string, args ...string) clients.Result {
	w.t.Helper()
	c := clients.Command{Path: filepath.Join(w.bin, "pullsecret"), Args: args}
	if stdin != "" {
		c.Stdin = []byte(stdin)
	}
	r, err := w.admin.Exec(context.Background(), c)
	w.record(r)
	if err != nil {
		w.t.Fatalf("pullsecret %s: %v\n%s", strings.Join(args, " "), err, r.Output())
	}
	return r
}

// token creates a project token with scope and returns it and its ID.
func (w *e2eWorld) token(scope, name string) (tok, id string) {
	w.t.Helper()
	r := w.pullsecret("", "token", "create", "--project", "acme", "--scope", scope, "--ttl", "1h", "--name", name)
	tok = strings.TrimSpace(r.Stdout)
	if !strings.HasPrefix(tok, "pst_") {
		w.t.Fatalf("token create printed %q", r.Stdout)
	}
	r = w.pullsecret("", "token", "list", "--project", "acme", "-o", "json")
	var list []struct {
		ID   string `json:"id"`
		Name string `json:"name"`
	}
	if err := json.Unmarshal([]byte(r.Stdout), &list); err != nil {
		w.t.Fatalf("token list -o json: %v\n%s", err, r.Stdout)
	}
	for _, it := range list {
		if it.Name == name {
			return tok, it.ID
		}
	}
	w.t.Fatalf("token %s not in token list:\n%s", name, r.Stdout)
	return "", ""
}

// image is the seeded image's name on the proxy.
func (w *e2eWorld) image() string { return w.srv.Host + "/up/team/app" }

func newE2EWorld(t *testing.T) *e2eWorld {
	t.Helper()
	return startE2EWorld(t, []string{"pullsecret", "docker-credential-pullsecret"}, "", nil)
}

// startE2EWorld builds bins, starts an upstream holding team/app:v1 (and
// whatever seed adds), stores its password as project acme's secret and
// runs `pullsecret serve` with the alias "up" and extraConfig.
func startE2EWorld(t *testing.T, bins []string, extraConfig string, seed func(context.Context, *registry.Registry) error) *e2eWorld {
	t.Helper()
	ctx := context.Background()
	w := &e2eWorld{t: t, bin: testbin.Build(t, bins...), home: filepath.Join(t.TempDir(), "home")}
	reg, err := registry.Start(ctx, registry.WithHTPasswd(map[string]string{"bot": e2eCanary}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	w.reg = reg
	img, err := reg.SeedRandom(ctx, "team/app", "v1", registry.Layers(2), registry.LayerSize(256<<10))
	if err != nil {
		t.Fatal(err)
	}
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	w.digest = d.String()
	if seed != nil {
		if err := seed(ctx, reg); err != nil {
			t.Fatal(err)
		}
	}
	w.admin = w.newEnv(clients.WithEnv("PULLSECRET_HOME=" + w.home))
	w.pullsecret(e2eCanary+"\n", "secret", "create", "team", "--registry", reg.Addr()+"/team",
		"--username", "bot", "--password-stdin", "--project", "acme")
	w.srv = testbin.Serve(t, w.bin, []string{"PULLSECRET_HOME=" + w.home},
		fmt.Sprintf("allow_private_upstreams: [127.0.0.1/32]\naliases:\n  up: %s\n", reg.Addr())+extraConfig)
	return w
}

// noCanaryInOutputAndFiles fails t when the upstream password occurs in
// any client's output or in clear in any file of the home or the clients'
// folders. It returns how many files and output bytes it read.
func (w *e2eWorld) noCanaryInOutputAndFiles(t *testing.T) (files, outBytes int) {
	t.Helper()
	w.mu.Lock()
	outs := strings.Join(w.output, "\n")
	dirs := append([]string{w.home}, w.dirs...)
	w.mu.Unlock()
	w.noCanary("client output", outs)
	canary := []byte(e2eCanary)
	for _, dir := range dirs {
		filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
			if err != nil || !d.Type().IsRegular() {
				return nil
			}
			b, err := os.ReadFile(p)
			if err != nil {
				return nil
			}
			files++
			if bytes.Contains(b, canary) {
				t.Errorf("the upstream password is in clear in %s", p)
			}
			return nil
		})
	}
	return files, len(outs)
}

// noCanary fails when the upstream password occurs in s.
func (w *e2eWorld) noCanary(what, s string) {
	w.t.Helper()
	if strings.Contains(s, e2eCanary) {
		w.t.Errorf("the upstream password appears in %s", what)
	}
}

// TestE2EProxy drives real clients through `pullsecret serve`.
func TestE2EProxy(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test: skipped under -short")
	}
	clients.Require(t, "crane")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	w := newE2EWorld(t)
	pullTok, pullID := w.token("pull", "e2e-pull")
	pushTok, _ := w.token("push", "e2e-push")

	// The pull clients hold only the pull token, through our helper in
	// remote mode: it answers the proxy's own host with the project token.
	env := w.newEnv(clients.WithHelperDir(w.bin), clients.WithEnv(
		"PULLSECRET_SERVER="+w.srv.URL, "PULLSECRET_TOKEN="+pullTok, "PULLSECRET_HOME="+t.TempDir()))
	env.CredHelper(w.srv.Host, "pullsecret")
	ref := w.image() + ":v1"

	t.Run("pull", func(t *testing.T) {
		t.Run("crane", func(t *testing.T) {
			t.Parallel()
			r, err := env.Crane(ctx, "digest", "--insecure", ref)
			w.record(r)
			if err != nil {
				t.Fatalf("crane digest: %v\n%s", err, r.Output())
			}
			if got := strings.TrimSpace(r.Stdout); got != w.digest {
				t.Errorf("crane digest = %s, want %s", got, w.digest)
			}
			r, err = env.Crane(ctx, "pull", "--insecure", ref, filepath.Join(env.Dir(), "crane.tar"))
			w.record(r)
			if err != nil {
				t.Fatalf("crane pull: %v\n%s", err, r.Output())
			}
		})
		t.Run("skopeo", func(t *testing.T) {
			t.Parallel()
			clients.Require(t, "skopeo")
			out := filepath.Join(env.Dir(), "skopeo-out")
			r, err := env.Skopeo(ctx, "copy", "--authfile", env.AuthFile(), "--src-tls-verify=false", "docker://"+ref, "dir:"+out)
			w.record(r)
			if err != nil {
				t.Fatalf("skopeo copy: %v\n%s", err, r.Output())
			}
			if _, err := os.Stat(filepath.Join(out, "manifest.json")); err != nil {
				t.Error(err)
			}
		})
		t.Run("podman", func(t *testing.T) {
			t.Parallel()
			clients.Require(t, "podman")
			p := clients.NewPodman(t, env)
			r, err := p.Podman(ctx, "pull", "--tls-verify=false", ref)
			w.record(r)
			if err != nil {
				t.Fatalf("podman pull: %v\n%s", err, r.Output())
			}
			r, err = p.Podman(ctx, "image", "inspect", "--format", "{{.Digest}}", ref)
			w.record(r)
			if err != nil || !strings.Contains(r.Stdout, w.digest) {
				t.Errorf("podman image inspect: %v\n%s", err, r.Output())
			}
		})
		t.Run("dockerd", func(t *testing.T) {
			t.Parallel()
			clients.Require(t, "dockerd", "docker")
			d := clients.StartDockerd(t, env, clients.WithDaemonConfig(map[string]any{"insecure-registries": []string{w.srv.Host}}))
			r, err := d.Docker(ctx, "pull", ref)
			w.record(r)
			if err != nil {
				t.Fatalf("docker pull: %v\n%s", err, r.Output())
			}
			if !strings.Contains(r.Stdout, w.digest) {
				t.Errorf("docker pull did not report digest %s:\n%s", w.digest, r.Output())
			}
			t.Cleanup(func() { w.noCanary("dockerd's log", d.Logs()) })
		})
		t.Run("containerd", func(t *testing.T) {
			t.Parallel()
			clients.Require(t, "containerd", "ctr")
			c := clients.StartContainerd(t)
			hostsDir := t.TempDir()
			w.mu.Lock()
			w.dirs = append(w.dirs, hostsDir)
			w.mu.Unlock()
			// Mirror mode: ctr pulls the upstream's own name, containerd
			// asks the proxy with ?ns=<upstream>.
			_, err := clients.WriteHostsDir(hostsDir, w.reg.Addr(), "http://"+w.reg.Addr(), clients.HostEntry{
				URL:          w.srv.URL,
				Capabilities: []string{"pull", "resolve"},
				Header:       map[string]string{"Authorization": "Basic " + base64.StdEncoding.EncodeToString([]byte("x:"+pullTok))},
			})
			if err != nil {
				t.Fatal(err)
			}
			r, err := c.Ctr(ctx, "images", "pull", "--hosts-dir", hostsDir, w.reg.Ref("team/app", "v1"))
			w.record(r)
			if err != nil {
				t.Fatalf("ctr pull through the mirror: %v\n%s", err, r.Output())
			}
			r, err = c.Ctr(ctx, "images", "ls")
			w.record(r)
			if err != nil || !strings.Contains(r.Stdout, w.digest) {
				t.Errorf("ctr images ls: %v\n%s", err, r.Output())
			}
			t.Cleanup(func() { w.noCanary("containerd's log", c.Logs()) })
		})
	})

	// Push with a push token, then read the result straight from the
	// upstream with the upstream's own credential.
	img, err := random.Image(64<<10, 2)
	if err != nil {
		t.Fatal(err)
	}
	imgTar := filepath.Join(t.TempDir(), "img.tar")
	if err := tarball.WriteToFile(imgTar, name.MustParseReference("x/y:z"), img); err != nil {
		t.Fatal(err)
	}
	want, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	t.Run("push", func(t *testing.T) {
		penv := w.newEnv()
		penv.Login(w.srv.Host, "ci", pushTok)
		r, err := penv.Crane(ctx, "push", "--insecure", imgTar, w.srv.Host+"/up/team/pushed:v1")
		w.record(r)
		if err != nil {
			t.Fatalf("crane push through the proxy: %v\n%s", err, r.Output())
		}
		d, err := name.ParseReference(w.reg.Ref("team/pushed", "v1"), name.Insecure)
		if err != nil {
			t.Fatal(err)
		}
		desc, err := remote.Get(d, remote.WithContext(ctx), remote.WithAuth(&authn.Basic{Username: "bot", Password: e2eCanary}))
		if err != nil {
			t.Fatalf("the pushed image is not on the upstream: %v", err)
		}
		if desc.Digest != want {
			t.Errorf("upstream digest %s, pushed %s", desc.Digest, want)
		}
	})

	t.Run("pull-token-cannot-push", func(t *testing.T) {
		penv := w.newEnv()
		penv.Login(w.srv.Host, "ci", pullTok)
		r, err := penv.Crane(ctx, "push", "--insecure", imgTar, w.srv.Host+"/up/team/denied:v1")
		w.record(r)
		if err == nil {
			t.Fatalf("crane push with a pull-only token succeeded:\n%s", r.Output())
		}
		if !strings.Contains(r.Output(), "DENIED") {
			t.Errorf("crane push with a pull-only token failed without a DENIED error:\n%s", r.Output())
		}
		if d, err := name.ParseReference(w.reg.Ref("team/denied", "v1"), name.Insecure); err == nil {
			if _, err := remote.Get(d, remote.WithContext(ctx), remote.WithAuth(&authn.Basic{Username: "bot", Password: e2eCanary})); err == nil {
				t.Error("the push with a pull-only token reached the upstream")
			}
		}
	})

	t.Run("revoked-token", func(t *testing.T) {
		get := func() (int, string) {
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, w.srv.URL+"/v2/up/team/app/manifests/v1", nil)
			req.SetBasicAuth("x", pullTok)
			req.Header.Set("Accept", "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			w.record(clients.Result{Cmd: "GET manifest", Stdout: string(b)})
			return resp.StatusCode, string(b)
		}
		if code, body := get(); code != http.StatusOK {
			t.Fatalf("before revoke: GET manifest = %d: %s", code, body)
		}
		w.pullsecret("", "token", "revoke", pullID)
		if code, body := get(); code != http.StatusUnauthorized {
			t.Errorf("after revoke: GET manifest = %d, want 401: %s", code, body)
		}
		r, err := env.Crane(ctx, "digest", "--insecure", ref)
		w.record(r)
		if err == nil {
			t.Errorf("crane digest with a revoked token succeeded:\n%s", r.Output())
		}
	})

	t.Run("canary", func(t *testing.T) {
		resp, err := http.Get(w.srv.URL + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		metrics, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || !bytes.Contains(metrics, []byte("# TYPE")) {
			t.Errorf("GET /metrics = %d:\n%.500s", resp.StatusCode, metrics)
		}
		w.noCanary("/metrics", string(metrics))
		w.noCanary("pullsecret serve's log", w.srv.Logs())
		files, outs := w.noCanaryInOutputAndFiles(t)
		if _, err := os.Stat(filepath.Join(w.home, "secrets.json")); err != nil {
			t.Errorf("no secrets.json in the home: %v", err)
		}
		t.Logf("grepped %d files, %d bytes of client output, %d bytes of server log", files, outs, len(w.srv.Logs()))
	})
}
