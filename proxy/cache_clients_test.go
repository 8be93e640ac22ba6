package proxy_test

// Issue 4 end to end: with the upstream stopped, what `pullsecret serve`
// cached still pulls with real clients — crane by path prefix, containerd
// through a hosts.toml mirror (?ns=) — by tag and by digest; a tag it never
// cached fails with an error a person can act on.

import (
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pullsecret/pullsecret/internal/clients"
	"github.com/pullsecret/pullsecret/registry"
)

// newCacheWorld is newE2EWorld with a cache that revalidates every tag and
// re-proves access on every request (tag_ttl and access_ttl of 1ms): once
// the upstream is down, every pull goes through the outage paths (stale
// tag, access on an earlier record) rather than through fresh entries.
// The upstream also holds team/app:v2, which no one pulls before it stops.
func newCacheWorld(t *testing.T) *e2eWorld {
	t.Helper()
	return startE2EWorld(t, []string{"pullsecret"}, "cache:\n  tag_ttl: 1ms\n  access_ttl: 1ms\nlog: {level: debug}\n",
		func(ctx context.Context, reg *registry.Registry) error {
			_, err := reg.SeedRandom(ctx, "team/app", "v2", registry.Layers(1), registry.RandSeed(2))
			return err
		})
}

// TestE2ECacheUpstreamDown: warm the cache with one crane pull, stop the
// upstream, then pull by tag and by digest with crane and with containerd.
func TestE2ECacheUpstreamDown(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test: skipped under -short")
	}
	clients.Require(t, "crane")
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	w := newCacheWorld(t)
	pullTok, _ := w.token("pull", "cache-e2e")
	env := w.newEnv()
	env.Login(w.srv.Host, "ci", pullTok)
	tagRef, digestRef := w.image()+":v1", w.image()+"@"+w.digest

	// Warm: one pull through the proxy while the upstream is up.
	r, err := env.Crane(ctx, "pull", "--insecure", "--format", "oci", tagRef, filepath.Join(env.Dir(), "warm"))
	w.record(r)
	if err != nil {
		t.Fatalf("warm crane pull: %v\n%s", err, r.Output())
	}
	upstreamURL := w.reg.URL()
	if err := w.reg.Close(); err != nil {
		t.Fatal(err)
	}
	if resp, err := http.Get(upstreamURL + "/v2/"); err == nil {
		resp.Body.Close()
		t.Fatalf("the upstream still answers after Close: %d", resp.StatusCode)
	}

	t.Run("cached", func(t *testing.T) {
		t.Run("crane-tag", func(t *testing.T) {
			t.Parallel()
			r, err := env.Crane(ctx, "digest", "--insecure", tagRef)
			w.record(r)
			if err != nil {
				t.Fatalf("crane digest with the upstream down: %v\n%s", err, r.Output())
			}
			if got := strings.TrimSpace(r.Stdout); got != w.digest {
				t.Errorf("crane digest = %s, want %s", got, w.digest)
			}
			cranePullOCI(ctx, t, w, env, tagRef, "tag")
		})
		t.Run("crane-digest", func(t *testing.T) {
			t.Parallel()
			cranePullOCI(ctx, t, w, env, digestRef, "digest")
		})
		// A fresh containerd for each, so no content is local already.
		t.Run("containerd-tag", func(t *testing.T) {
			t.Parallel()
			ctrPull(ctx, t, w, pullTok, "v1")
		})
		t.Run("containerd-digest", func(t *testing.T) {
			t.Parallel()
			ctrPull(ctx, t, w, pullTok, w.digest)
		})
	})

	t.Run("never-cached", func(t *testing.T) {
		t.Run("crane", func(t *testing.T) {
			t.Parallel()
			r, err := env.Crane(ctx, "pull", "--insecure", w.image()+":v2", filepath.Join(env.Dir(), "v2.tar"))
			w.record(r)
			if err == nil {
				t.Fatalf("crane pulled a tag never cached with the upstream down:\n%s", r.Output())
			}
			// The proxy's own words: which upstream, and that it is down.
			t.Logf("crane shows: %s", strings.TrimSpace(r.Stderr))
			want := fmt.Sprintf("UNAVAILABLE: upstream %s is unreachable", w.reg.Addr())
			if !strings.Contains(r.Stderr, want) {
				t.Errorf("crane's error lacks %q:\n%s", want, r.Output())
			}
		})
		t.Run("containerd", func(t *testing.T) {
			t.Parallel()
			clients.Require(t, "containerd", "ctr")
			c := clients.StartContainerd(t)
			hosts := mirrorHosts(t, w, pullTok)
			r, err := c.Ctr(ctx, "images", "pull", "--hosts-dir", hosts, w.reg.Ref("team/app", "v2"))
			w.record(r)
			t.Cleanup(func() { w.noCanary("containerd's log", c.Logs()) })
			if err == nil {
				t.Fatalf("ctr pulled a tag never cached with the upstream down:\n%s", r.Output())
			}
			// containerd resolves with a HEAD, whose answer has no body:
			// what it shows is that the mirror (the proxy) answered 502.
			t.Logf("ctr shows: %s", strings.TrimSpace(r.Output()))
			for _, want := range []string{"pulling from host " + w.srv.Host, "502 Bad Gateway"} {
				if !strings.Contains(r.Output(), want) {
					t.Errorf("ctr's error lacks %q:\n%s", want, r.Output())
				}
			}
		})
	})

	t.Run("canary", func(t *testing.T) {
		resp, err := http.Get(w.srv.URL + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		metrics, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		w.noCanary("/metrics", string(metrics))
		logs := w.srv.Logs()
		w.noCanary("pullsecret serve's log", logs)
		if strings.Contains(logs, pullTok) {
			t.Error("the project token appears in pullsecret serve's log")
		}
		if !strings.Contains(logs, "serving a stale tag") || !strings.Contains(logs, "serving from the cache on an earlier access record") {
			t.Errorf("the pulls did not take the outage paths (no stale-tag or earlier-record serve in the log):\n%s", logs)
		}
		files, outs := w.noCanaryInOutputAndFiles(t)
		t.Logf("grepped %d files, %d bytes of client output, %d bytes of server log", files, outs, len(logs))
	})
}

// cranePullOCI pulls ref with crane into an OCI layout (crane verifies
// every blob's digest as it reads it) and checks the layout names the
// image's manifest digest.
func cranePullOCI(ctx context.Context, t *testing.T, w *e2eWorld, env *clients.Env, ref, name string) {
	t.Helper()
	out := filepath.Join(env.Dir(), "down-"+name)
	r, err := env.Crane(ctx, "pull", "--insecure", "--format", "oci", ref, out)
	w.record(r)
	if err != nil {
		t.Fatalf("crane pull %s with the upstream down: %v\n%s", ref, err, r.Output())
	}
	idx, err := os.ReadFile(filepath.Join(out, "index.json"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(idx), w.digest) {
		t.Errorf("crane pull %s: index.json does not name %s:\n%s", ref, w.digest, idx)
	}
	h := strings.TrimPrefix(w.digest, "sha256:")
	if _, err := os.Stat(filepath.Join(out, "blobs", "sha256", h)); err != nil {
		t.Errorf("crane pull %s: manifest blob missing: %v", ref, err)
	}
}

// mirrorHosts writes a hosts.toml that sends containerd's pulls of the
// upstream to the proxy (mirror mode, ?ns=<upstream>) with the pull token.
func mirrorHosts(t *testing.T, w *e2eWorld, tok string) string {
	t.Helper()
	dir := t.TempDir()
	w.mu.Lock()
	w.dirs = append(w.dirs, dir)
	w.mu.Unlock()
	_, err := clients.WriteHostsDir(dir, w.reg.Addr(), "http://"+w.reg.Addr(), clients.HostEntry{
		URL:          w.srv.URL,
		Capabilities: []string{"pull", "resolve"},
		Header:       map[string]string{"Authorization": "Basic " + base64.StdEncoding.EncodeToString([]byte("x:"+tok))},
	})
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

// ctrPull pulls the upstream's team/app at ref (a tag or a digest) with a
// fresh containerd through the proxy mirror; containerd checks every
// digest before it stores the content.
func ctrPull(ctx context.Context, t *testing.T, w *e2eWorld, tok, ref string) {
	t.Helper()
	clients.Require(t, "containerd", "ctr")
	c := clients.StartContainerd(t)
	t.Cleanup(func() { w.noCanary("containerd's log", c.Logs()) })
	hosts := mirrorHosts(t, w, tok)
	r, err := c.Ctr(ctx, "images", "pull", "--hosts-dir", hosts, w.reg.Ref("team/app", ref))
	w.record(r)
	if err != nil {
		t.Fatalf("ctr pull %s through the mirror with the upstream down: %v\n%s", ref, err, r.Output())
	}
	r, err = c.Ctr(ctx, "images", "ls")
	w.record(r)
	if err != nil || !strings.Contains(r.Stdout, w.digest) {
		t.Errorf("ctr images ls after pulling %s: %v\n%s", ref, err, r.Output())
	}
	r, err = c.Ctr(ctx, "content", "ls")
	w.record(r)
	if err != nil || strings.Count(r.Stdout, "sha256:") < 4 { // manifest, config, two layers
		t.Errorf("ctr content ls after pulling %s: %v\n%s", ref, err, r.Output())
	}
}
