package clients_test

import (
	"archive/tar"
	"context"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/pullsecret/pullsecret/internal/clients"
)

// testRegistry is go-containerregistry's in-memory registry on 127.0.0.1,
// optionally behind Basic auth, recording every request.
type testRegistry struct {
	URL  string
	Host string // 127.0.0.1:PORT

	mu   sync.Mutex
	reqs []string
}

func newTestRegistry(t *testing.T, user, pass string) *testRegistry {
	t.Helper()
	r := &testRegistry{}
	inner := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	h := http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		u, p, ok := req.BasicAuth()
		authed := ok && subtle.ConstantTimeCompare([]byte(u), []byte(user)) == 1 &&
			subtle.ConstantTimeCompare([]byte(p), []byte(pass)) == 1
		r.mu.Lock()
		r.reqs = append(r.reqs, fmt.Sprintf("%s %s auth=%v ua=%q", req.Method, req.URL.RequestURI(), authed, req.UserAgent()))
		r.mu.Unlock()
		if user != "" && !authed {
			w.Header().Set("WWW-Authenticate", `Basic realm="clients-test"`)
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusUnauthorized)
			_, _ = io.WriteString(w, `{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`)
			return
		}
		inner.ServeHTTP(w, req)
	})
	srv := httptest.NewServer(h) // listens on 127.0.0.1
	t.Cleanup(srv.Close)
	r.URL = srv.URL
	r.Host = strings.TrimPrefix(srv.URL, "http://")
	return r
}

func (r *testRegistry) requests() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.reqs...)
}

func pushBusybox(t *testing.T, ref string, opts ...remote.Option) v1.Hash {
	t.Helper()
	img, err := clients.BusyboxImage()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	d, err := clients.Push(ctx, ref, img, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return c
}

// must(t)(client call) fails the test when the call failed.
func must(t *testing.T) func(clients.Result, error) clients.Result {
	return func(res clients.Result, err error) clients.Result {
		t.Helper()
		if err != nil {
			t.Fatalf("%v\nstdout: %s", err, res.Stdout)
		}
		return res
	}
}

func TestBusyboxImage(t *testing.T) {
	clients.Require(t, "busybox")
	img, err := clients.BusyboxImage()
	if err != nil {
		t.Fatal(err)
	}
	img2, err := clients.BusyboxImage()
	if err != nil {
		t.Fatal(err)
	}
	d1, _ := img.Digest()
	d2, _ := img2.Digest()
	if d1 != d2 {
		t.Errorf("not deterministic: %s != %s", d1, d2)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cf.OS != "linux" || cf.Architecture == "" || len(cf.Config.Cmd) != 1 || cf.Config.Cmd[0] != "sh" {
		t.Errorf("config: os=%q arch=%q cmd=%q", cf.OS, cf.Architecture, cf.Config.Cmd)
	}
	layers, err := img.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("layers: %d %v", len(layers), err)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	files := map[string]string{}
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		files[h.Name] = h.Linkname
	}
	if _, ok := files["bin/busybox"]; !ok {
		t.Errorf("no bin/busybox in %v", files)
	}
	for _, a := range []string{"sh", "env"} {
		if files["bin/"+a] != "busybox" {
			t.Errorf("bin/%s -> %q, want busybox", a, files["bin/"+a])
		}
	}
	if sz, _ := layers[0].Size(); sz > 4<<20 {
		t.Errorf("layer is %d bytes", sz)
	}
}

func TestHostsTOML(t *testing.T) {
	got := clients.HostsTOML("https://mirror.example", clients.HostEntry{
		URL: "http://127.0.0.1:5000", Header: map[string]string{"Authorization": "Bearer x"},
	})
	want := `server = "https://mirror.example"

[host."http://127.0.0.1:5000"]
  capabilities = ["pull", "resolve"]
  [host."http://127.0.0.1:5000".header]
    "Authorization" = ["Bearer x"]
`
	if got != want {
		t.Errorf("got\n%s\nwant\n%s", got, want)
	}
}

// TestPull pulls one image from an in-process registry with every client and
// runs it with docker and podman.
func TestPull(t *testing.T) {
	reg := newTestRegistry(t, "", "")
	ref := reg.Host + "/t/app:v1"
	digest := pushBusybox(t, ref)
	t.Logf("pushed %s@%s", ref, digest)

	t.Run("crane", func(t *testing.T) {
		t.Parallel()
		clients.Require(t, "crane")
		env := clients.NewEnv(t)
		res := must(t)(env.Crane(ctx(t), "digest", "--insecure", ref))
		if strings.TrimSpace(res.Stdout) != digest.String() {
			t.Errorf("crane digest = %q, want %s", res.Stdout, digest)
		}
		out := filepath.Join(env.Dir(), "image.tar")
		must(t)(env.Crane(ctx(t), "pull", "--insecure", ref, out))
		if fi, err := os.Stat(out); err != nil || fi.Size() < 100<<10 {
			t.Errorf("crane pull wrote %v %v", fi, err)
		}
	})

	t.Run("skopeo", func(t *testing.T) {
		t.Parallel()
		clients.Require(t, "skopeo")
		env := clients.NewEnv(t)
		out := filepath.Join(env.Dir(), "out")
		must(t)(env.Skopeo(ctx(t), "copy", "--authfile", env.AuthFile(), "--src-tls-verify=false",
			"docker://"+ref, "dir:"+out))
		if _, err := os.Stat(filepath.Join(out, "manifest.json")); err != nil {
			t.Error(err)
		}
	})

	t.Run("podman", func(t *testing.T) {
		t.Parallel()
		env := clients.NewEnv(t)
		p := clients.NewPodman(t, env)
		must(t)(p.Podman(ctx(t), "pull", "--tls-verify=false", ref))
		res := must(t)(p.RunContainerWith(ctx(t), []string{"-e", "MARK=podman-ok"}, ref, "sh", "-c", "env"))
		if !strings.Contains(res.Stdout, "MARK=podman-ok") || !strings.Contains(res.Stdout, "PATH=/bin") {
			t.Errorf("podman run env:\n%s", res.Stdout)
		}
		res = must(t)(p.RunContainer(ctx(t), ref, "sh", "-c", "ulimit -n"))
		if strings.TrimSpace(res.Stdout) != "1024" {
			t.Errorf("ulimit -n = %q", res.Stdout)
		}
	})

	t.Run("docker", func(t *testing.T) {
		t.Parallel()
		env := clients.NewEnv(t)
		d := clients.StartDockerd(t, env)
		must(t)(d.Docker(ctx(t), "pull", ref))
		res := must(t)(d.RunContainerWith(ctx(t), []string{"-e", "MARK=docker-ok"}, ref, "sh", "-c", "env"))
		if !strings.Contains(res.Stdout, "MARK=docker-ok") || !strings.Contains(res.Stdout, "PATH=/bin") {
			t.Errorf("docker run env:\n%s", res.Stdout)
		}
		if !strings.Contains(d.Logs(), "API listen on") {
			t.Errorf("dockerd log has no 'API listen on'")
		}
	})

	t.Run("ctr", func(t *testing.T) {
		t.Parallel()
		c := clients.StartContainerd(t)
		hosts, err := clients.WriteHostsDir(filepath.Join(t.TempDir(), "hosts"), "mirror.example",
			"https://mirror.example", clients.HostEntry{URL: "http://" + reg.Host})
		if err != nil {
			t.Fatal(err)
		}
		must(t)(c.Ctr(ctx(t), "images", "pull", "--hosts-dir", hosts, "mirror.example/t/app:v1"))
		res := must(t)(c.Ctr(ctx(t), "images", "ls", "-q"))
		if !strings.Contains(res.Stdout, "mirror.example/t/app:v1") {
			t.Errorf("ctr images ls: %s", res.Stdout)
		}
		var ns bool
		for _, r := range reg.requests() {
			if strings.Contains(r, "ns=mirror.example") {
				ns = true
			}
		}
		if !ns {
			t.Errorf("no request with ?ns=mirror.example:\n%s", strings.Join(reg.requests(), "\n"))
		}
	})
}

// TestCredentialHelper puts a registry behind Basic auth and checks that
// crane, skopeo, podman and docker get the credentials from a credential
// helper named in credHelpers, and records what server URL each one asks the
// helper about. ctr never calls a helper; it authenticates with a hosts.toml
// header.
func TestCredentialHelper(t *testing.T) {
	const user, secret = "u", "p-canary-5EC2E7"
	reg := newTestRegistry(t, user, secret)
	ref := reg.Host + "/t/app:v1"
	pushBusybox(t, ref, remote.WithAuth(&authn.Basic{Username: user, Password: secret}))

	var mu sync.Mutex
	seen := map[string][]string{}
	record := func(t *testing.T, client string, h *clients.FakeHelper, outputs ...string) {
		t.Helper()
		gets := h.Gets()
		if len(gets) == 0 {
			t.Errorf("%s never called the helper's get; calls: %+v", client, h.Calls())
		}
		for _, c := range h.Calls() {
			if c.Verb != "get" {
				t.Errorf("%s called the helper with %q", client, c.Verb)
			}
		}
		for _, o := range outputs {
			if strings.Contains(o, secret) {
				t.Errorf("%s printed the secret:\n%s", client, o)
			}
		}
		mu.Lock()
		seen[client] = gets
		mu.Unlock()
		t.Logf("%s asked the helper for: %q", client, gets)
	}
	newEnv := func(t *testing.T) (*clients.Env, *clients.FakeHelper) {
		h := clients.NewFakeHelper(t, "fake", user, secret)
		env := clients.NewEnv(t, clients.WithHelperDir(h.Dir))
		env.CredHelper(reg.Host, h.Suffix)
		return env, h
	}

	t.Run("clients", func(t *testing.T) {
		t.Run("anonymous-fails", func(t *testing.T) {
			t.Parallel()
			clients.Require(t, "crane")
			env := clients.NewEnv(t)
			res, err := env.Crane(ctx(t), "digest", "--insecure", ref)
			if err == nil || !res.Contains("UNAUTHORIZED") {
				t.Errorf("anonymous crane digest: err=%v\n%s", err, res.Output())
			}
		})
		t.Run("crane", func(t *testing.T) {
			t.Parallel()
			clients.Require(t, "crane")
			env, h := newEnv(t)
			res := must(t)(env.Crane(ctx(t), "pull", "--insecure", ref, filepath.Join(env.Dir(), "i.tar")))
			record(t, "crane", h, res.Stdout, res.Stderr)
		})
		t.Run("skopeo", func(t *testing.T) {
			t.Parallel()
			clients.Require(t, "skopeo")
			env, h := newEnv(t)
			res := must(t)(env.Skopeo(ctx(t), "copy", "--authfile", env.AuthFile(), "--src-tls-verify=false",
				"docker://"+ref, "dir:"+filepath.Join(env.Dir(), "out")))
			record(t, "skopeo", h, res.Stdout, res.Stderr)
		})
		t.Run("podman", func(t *testing.T) {
			t.Parallel()
			env, h := newEnv(t)
			p := clients.NewPodman(t, env)
			res := must(t)(p.Podman(ctx(t), "pull", "--tls-verify=false", ref))
			run := must(t)(p.RunContainer(ctx(t), ref, "sh", "-c", "env"))
			record(t, "podman", h, res.Stdout, res.Stderr, run.Stdout, run.Stderr)
		})
		t.Run("docker", func(t *testing.T) {
			t.Parallel()
			env, h := newEnv(t)
			d := clients.StartDockerd(t, env)
			res := must(t)(d.Docker(ctx(t), "pull", ref))
			run := must(t)(d.RunContainer(ctx(t), ref, "sh", "-c", "env"))
			record(t, "docker", h, res.Stdout, res.Stderr, run.Stdout, run.Stderr, d.Logs())
		})
		// The same, with the helper as the default store (credsStore): every
		// lookup reaches it, so it sees what the client tries first.
		t.Run("crane-credsStore", func(t *testing.T) {
			t.Parallel()
			clients.Require(t, "crane")
			h := clients.NewFakeHelper(t, "fake", user, secret)
			env := clients.NewEnv(t, clients.WithHelperDir(h.Dir))
			env.CredsStore(h.Suffix)
			res := must(t)(env.Crane(ctx(t), "pull", "--insecure", ref, filepath.Join(env.Dir(), "i.tar")))
			record(t, "crane (credsStore)", h, res.Stdout, res.Stderr)
		})
		t.Run("docker-credsStore", func(t *testing.T) {
			t.Parallel()
			h := clients.NewFakeHelper(t, "fake", user, secret)
			env := clients.NewEnv(t, clients.WithHelperDir(h.Dir))
			env.CredsStore(h.Suffix)
			d := clients.StartDockerd(t, env)
			// run pulls the missing image: the CLI asks the helper too.
			run := must(t)(d.RunContainer(ctx(t), ref, "sh", "-c", "env"))
			record(t, "docker run (credsStore)", h, run.Stdout, run.Stderr, d.Logs())
		})
		// containers/image: a helper named in registries.conf credential-helpers.
		t.Run("skopeo-registries.conf", func(t *testing.T) {
			t.Parallel()
			clients.Require(t, "skopeo")
			h := clients.NewFakeHelper(t, "fake", user, secret)
			env := clients.NewEnv(t, clients.WithHelperDir(h.Dir))
			env.SetRegistriesConf("unqualified-search-registries = []\ncredential-helpers = [\"" + h.Suffix + "\"]\n")
			res := must(t)(env.Skopeo(ctx(t), "inspect", "--tls-verify=false", "docker://"+ref))
			record(t, "skopeo (registries.conf)", h, res.Stdout, res.Stderr)
		})
		t.Run("ctr", func(t *testing.T) {
			t.Parallel()
			c := clients.StartContainerd(t)
			hosts, err := clients.WriteHostsDir(filepath.Join(t.TempDir(), "hosts"), reg.Host, "http://"+reg.Host,
				clients.HostEntry{URL: "http://" + reg.Host, Header: map[string]string{
					"Authorization": "Basic " + basic(user, secret)}})
			if err != nil {
				t.Fatal(err)
			}
			res := must(t)(c.Ctr(ctx(t), "images", "pull", "--hosts-dir", hosts, ref))
			if strings.Contains(res.Output(), secret) {
				t.Errorf("ctr printed the secret")
			}
		})
	})

	var names []string
	for k := range seen {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		t.Logf("server URL sent to the helper by %-7s %q", k+":", seen[k])
	}
}

func basic(u, p string) string {
	return base64.StdEncoding.EncodeToString([]byte(u + ":" + p))
}
