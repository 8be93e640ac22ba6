package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/pullsecret/pullsecret/audit"
	"github.com/pullsecret/pullsecret/internal/testbin"
	"github.com/pullsecret/pullsecret/proxy/cache"
	"github.com/pullsecret/pullsecret/registry"
	"github.com/pullsecret/pullsecret/secret"
)

// warmFixture is an upstream registry holding a multi-platform index
// behind the canary password.
type warmFixture struct {
	up  *registry.Registry
	idx v1.ImageIndex
	// platforms of the index, in its order.
	platforms []v1.Platform
}

func newWarmFixture(t *testing.T) *warmFixture {
	t.Helper()
	ctx := context.Background()
	up, err := registry.Start(ctx, registry.WithHTPasswd(map[string]string{"bot": canary}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { up.Close() })
	f := &warmFixture{up: up, platforms: []v1.Platform{
		{OS: "linux", Architecture: "amd64"},
		{OS: "linux", Architecture: "arm64", Variant: "v8"},
	}}
	var adds []mutate.IndexAddendum
	for i, p := range f.platforms {
		img, err := random.Image(int64(2048+512*i), 2)
		if err != nil {
			t.Fatal(err)
		}
		p := p
		adds = append(adds, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: &p}})
	}
	f.idx = mutate.AppendManifests(empty.Index, adds...)
	if err := up.SeedIndex(ctx, "team/app", "v1", f.idx); err != nil {
		t.Fatal(err)
	}
	return f
}

// ref is the image as 'cache warm' is given it: the registry's own host.
func (f *warmFixture) ref(tag string) string { return f.up.Ref("team/app", tag) }

// lines are the plain lines a warm of the platforms (all when none) must
// print, as "DIGEST SIZE" after "warm IMAGE ", sorted.
func (f *warmFixture) lines(t *testing.T, status string, platforms ...v1.Platform) []string {
	t.Helper()
	im, err := f.idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := f.idx.RawManifest()
	d, _ := f.idx.Digest()
	out := []string{fmt.Sprintf("%s %d %s", d, len(raw), status)}
	for _, desc := range im.Manifests {
		if len(platforms) > 0 && !slices.ContainsFunc(platforms, func(p v1.Platform) bool { return desc.Platform.Satisfies(p) }) {
			continue
		}
		img, err := f.idx.Image(desc.Digest)
		if err != nil {
			t.Fatal(err)
		}
		m, _ := img.Manifest()
		out = append(out, fmt.Sprintf("%s %d %s", desc.Digest, desc.Size, status),
			fmt.Sprintf("%s %d %s", m.Config.Digest, m.Config.Size, status))
		for _, l := range m.Layers {
			out = append(out, fmt.Sprintf("%s %d %s", l.Digest, l.Size, status))
		}
	}
	slices.Sort(out)
	return out
}

// blobGETs counts the blob GETs the upstream answered with content.
func (f *warmFixture) blobGETs() int {
	n := 0
	for _, r := range f.up.Requests() {
		if r.Method == http.MethodGet && strings.Contains(r.Path, "/blobs/") && r.Bytes > 0 {
			n++
		}
	}
	return n
}

// dump logs the upstream's request log, to explain a failure.
func (f *warmFixture) dump(t *testing.T) {
	t.Helper()
	for _, r := range f.up.Requests() {
		t.Logf("upstream: %s %s %s -> %d, %d bytes", r.Time.Format("15:04:05.000000"), r.Method, r.Path, r.Status, r.Bytes)
	}
}

// addSecret stores the upstream's pull secret for project.
func (f *warmFixture) addSecret(t *testing.T, e *env, project, password string) {
	t.Helper()
	p, err := secret.ParsePattern(f.up.Host())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.store().Create(context.Background(), secret.Secret{Project: project, Name: "up", Kind: secret.Basic, Registries: []secret.Pattern{p}},
		secret.Value{Username: "bot", Password: password}); err != nil {
		t.Fatal(err)
	}
}

// warmConfig is the serve config both commands read: loopback upstreams
// allowed, and an alias for the upstream (crane and go-containerregistry
// cannot name a host:port as the first path component of a repository).
func warmConfig(t *testing.T, f *warmFixture) (file, body string) {
	body = "allow_private_upstreams: [127.0.0.1]\naliases: {up: " + f.up.Host() + "}\n"
	file = filepath.Join(t.TempDir(), "serve.yaml")
	if err := os.WriteFile(file, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return file, body
}

var warmLineRE = regexp.MustCompile(`^warm (\S+) (sha256:[0-9a-f]{64} \d+ (?:cached|already cached))$`)

// warmLines checks stdout is plain lines for image and a summary, and
// returns the "DIGEST SIZE STATUS" parts, sorted, and the summary.
func warmLines(t *testing.T, stdout, image string) ([]string, string) {
	t.Helper()
	all := strings.Split(strings.TrimSuffix(stdout, "\n"), "\n")
	if len(all) < 2 {
		t.Fatalf("warm printed %q", stdout)
	}
	var out []string
	for _, l := range all[:len(all)-1] {
		m := warmLineRE.FindStringSubmatch(l)
		if m == nil || m[1] != image {
			t.Fatalf("not a warm line for %s: %q\n%s", image, l, stdout)
		}
		out = append(out, m[2])
	}
	slices.Sort(out)
	return out, all[len(all)-1]
}

// runCLI runs the CLI in-process without env.run's rule that a success
// prints nothing on stderr (debug logs do), keeping the output for the
// canary check.
func runCLI(e *env, args ...string) result {
	e.t.Helper()
	var out, errb bytes.Buffer
	code := run(context.Background(), args, strings.NewReader(""), &out, &errb, e.getenv)
	e.mu.Lock()
	e.outputs = append(e.outputs, out.String(), errb.String())
	e.mu.Unlock()
	return result{code: code, stdout: out.String(), stderr: errb.String()}
}

// pullAll pulls every image of ref through a proxy and reads every blob.
func pullAll(t *testing.T, ref, token string, platform *v1.Platform) []v1.Hash {
	t.Helper()
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	opts := []remote.Option{remote.WithAuth(&authn.Basic{Username: "ci", Password: token})}
	var imgs []v1.Image
	if platform != nil {
		img, err := remote.Image(r, append(opts, remote.WithPlatform(*platform))...)
		if err != nil {
			t.Fatalf("pull %s through serve: %v", ref, err)
		}
		imgs = append(imgs, img)
	} else {
		idx, err := remote.Index(r, opts...)
		if err != nil {
			t.Fatalf("pull %s through serve: %v", ref, err)
		}
		im, err := idx.IndexManifest()
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range im.Manifests {
			img, err := idx.Image(d.Digest)
			if err != nil {
				t.Fatal(err)
			}
			imgs = append(imgs, img)
		}
	}
	var got []v1.Hash
	for _, img := range imgs {
		d, _ := img.Digest()
		got = append(got, d)
		if _, err := img.RawConfigFile(); err != nil {
			t.Fatalf("config of %s: %v", d, err)
		}
		layers, err := img.Layers()
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range layers {
			rc, err := l.Compressed() // verifies the digest at EOF
			if err != nil {
				t.Fatal(err)
			}
			if _, err := io.Copy(io.Discard, rc); err != nil {
				t.Fatalf("layer of %s: %v", d, err)
			}
			rc.Close()
		}
	}
	return got
}

// TestCacheWarm warms a multi-platform index (every platform, then one
// platform into a fresh cache while serve runs on it), and pulls it through
// 'pullsecret serve' processes on the same homes: the upstream sends no
// blob to them.
func TestCacheWarm(t *testing.T) {
	if testing.Short() {
		t.Skip("runs pullsecret serve processes")
	}
	t.Parallel()
	bin := testbin.Build(t, "pullsecret")

	// Each subtest has its own upstream: its request log counts its own
	// blob fetches only.
	t.Run("all platforms", func(t *testing.T) {
		t.Parallel()
		f := newWarmFixture(t)
		cfgFile, cfgBody := warmConfig(t, f)
		image := f.ref("v1")
		e := newEnv(t)
		f.addSecret(t, e, "acme", canary)
		r := runCLI(e, "cache", "warm", "--project", "acme", "--config", cfgFile, "--log-level", "debug", image)
		if r.code != 0 {
			t.Fatalf("warm: exit %d\n%s", r.code, r.stderr)
		}
		got, summary := warmLines(t, r.stdout, image)
		if want := f.lines(t, "cached"); !slices.Equal(got, want) {
			t.Fatalf("warm lines:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
		if want := "warmed 1 image (3 manifests, 6 blobs): 9 cached ("; !strings.HasPrefix(summary, want) || !strings.HasSuffix(summary, "), 0 already cached") {
			t.Errorf("summary %q", summary)
		}
		// The debug log shows the requests went through the proxy's code,
		// as project acme.
		if !strings.Contains(r.stderr, "project=acme") || !strings.Contains(r.stderr, "upstream="+f.up.Host()) {
			t.Errorf("the request log lacks project or upstream:\n%s", r.stderr)
		}
		// Access was proven with acme's own credential, and kept for the
		// servers started afterwards.
		if b, err := os.ReadFile(filepath.Join(e.home, "access.json")); err != nil || !strings.Contains(string(b), `"project": "acme"`) {
			t.Errorf("access.json: %v\n%s", err, b)
		}
		// The audit trail records each pull of the warm-up as the
		// operator's: project, upstream, digest, no token, no client.
		var warmed int
		for _, line := range strings.Split(strings.TrimSpace(e.must("", "audit", "--config", cfgFile, "-o", "json")), "\n") {
			var ev audit.Event
			if err := json.Unmarshal([]byte(line), &ev); err != nil {
				t.Fatalf("audit line %q: %v", line, err)
			}
			if ev.Via != audit.ViaWarm || ev.Project != "acme" || ev.Decision != audit.Allowed || ev.Action != audit.ActionPull ||
				ev.Upstream != f.up.Host() || ev.Digest == "" || ev.TokenID != "" || ev.Client != "" ||
				!strings.HasPrefix(ev.Subject, "pullsecret cache warm by ") {
				t.Errorf("audit event of the warm-up: %+v", ev)
			}
			warmed++
		}
		if warmed != 9 {
			t.Errorf("%d audit events for a warm-up of 3 manifests and 6 blobs", warmed)
		}

		// Warm again: everything is there; the upstream sends no blob.
		before := f.blobGETs()
		out := e.must("", "cache", "warm", "--project", "acme", "--config", cfgFile, image)
		got, summary = warmLines(t, out, image)
		if want := f.lines(t, "already cached"); !slices.Equal(got, want) {
			t.Fatalf("second warm:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
		if !strings.HasSuffix(summary, ": 0 cached (0 B), 9 already cached") {
			t.Errorf("second summary %q", summary)
		}
		if n := f.blobGETs() - before; n != 0 {
			t.Errorf("the second warm fetched %d blobs upstream", n)
			f.dump(t)
		}

		// A pull through serve on this home comes from the cache.
		tok := strings.TrimSpace(e.must("", "token", "create", "--project", "acme"))
		srv := testbin.Serve(t, bin, []string{"PULLSECRET_HOME=" + e.home}, cfgBody)
		before = f.blobGETs()
		if got := pullAll(t, srv.Host+"/up/team/app:v1", tok, nil); len(got) != 2 {
			t.Fatalf("pulled %d images", len(got))
		}
		if n := f.blobGETs() - before; n != 0 {
			t.Errorf("the pull through serve fetched %d blobs upstream after warm", n)
			f.dump(t)
		}
		logs := srv.Logs()
		if strings.Contains(logs, canary) || strings.Contains(logs, tok) {
			t.Errorf("a credential reached the serve log:\n%s", logs)
		}
	})

	t.Run("one platform, serve running", func(t *testing.T) {
		t.Parallel()
		f := newWarmFixture(t)
		cfgFile, cfgBody := warmConfig(t, f)
		image := f.ref("v1")
		e := newEnv(t)
		f.addSecret(t, e, "acme", canary)
		tok := strings.TrimSpace(e.must("", "token", "create", "--project", "acme"))
		srv := testbin.Serve(t, bin, []string{"PULLSECRET_HOME=" + e.home}, cfgBody)
		arm := v1.Platform{OS: "linux", Architecture: "arm64"}
		out := e.must("", "cache", "warm", "--project", "acme", "--config", cfgFile, "--platform", "linux/arm64", image)
		got, summary := warmLines(t, out, image)
		if want := f.lines(t, "cached", arm); !slices.Equal(got, want) {
			t.Fatalf("warm --platform lines:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
		if !strings.HasPrefix(summary, "warmed 1 image (2 manifests, 3 blobs): 5 cached (") {
			t.Errorf("summary %q", summary)
		}
		before := f.blobGETs()
		if got := pullAll(t, srv.Host+"/up/team/app:v1", tok, &arm); len(got) != 1 {
			t.Fatalf("pulled %d images", len(got))
		}
		if n := f.blobGETs() - before; n != 0 {
			t.Errorf("the pull through the running serve fetched %d blobs upstream after warm", n)
			f.dump(t)
		}
		if logs := srv.Logs(); strings.Contains(logs, canary) || strings.Contains(logs, tok) {
			t.Errorf("a credential reached the serve log:\n%s", logs)
		}
	})
}

// TestCacheWarmErrors: every mistake exits non-zero with a message that
// says what is wrong, and never the credential.
func TestCacheWarmErrors(t *testing.T) {
	t.Parallel()
	f := newWarmFixture(t)
	cfgFile, _ := warmConfig(t, f)
	e := newEnv(t)
	f.addSecret(t, e, "acme", canary)
	f.addSecret(t, e, "wrong", canary+"-not-it")
	offFile := filepath.Join(t.TempDir(), "off.yaml")
	if err := os.WriteFile(offFile, []byte("cache: {enabled: false}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	image := f.ref("v1")
	warm := []string{"cache", "warm", "--config", cfgFile}
	for _, tc := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"unknown project", []string{"--project", "nosuch", image}, 1, `unknown project "nosuch": it has no pull secrets`},
		{"registry without a pull secret", []string{"--project", "acme", "ghcr.io/acme/app:1.0"}, 1,
			"warm ghcr.io/acme/app:1.0: ghcr.io is not an upstream of project acme"},
		{"wrong credential", []string{"--project", "wrong", image}, 1,
			"warm " + image + ": upstream rejected the project's pull secret for " + f.up.Host()},
		{"missing tag", []string{"--project", "acme", f.ref("v9")}, 1, `warm ` + f.ref("v9") + `: tag "v9" not found (manifest unknown to ` + f.up.Host() + `)`},
		{"missing digest", []string{"--project", "acme", f.ref("sha256:" + strings.Repeat("0", 64))}, 1, "manifest sha256:" + strings.Repeat("0", 64) + " not found"},
		{"no such platform", []string{"--project", "acme", "--platform", "linux/s390x", image}, 1, "no manifest for linux/s390x in index sha256:"},
		{"bad reference", []string{"--project", "acme", "UPPER/Case::x"}, 1, "UPPER/Case::x: not an image reference"},
		{"bad platform", []string{"--project", "acme", "--platform", "linux", image}, exitUsage, `--platform: "linux" is not OS/ARCH[/VARIANT]`},
		{"no image", []string{"--project", "acme"}, exitUsage, "name at least one IMAGE"},
		{"bad log level", []string{"--project", "acme", "--log-level", "loud", image}, exitUsage, `--log-level: unknown level "loud"`},
	} {
		r := e.run("", append(slices.Clone(warm), tc.args...)...)
		if r.code != tc.code || !strings.Contains(r.stderr, tc.want) {
			t.Errorf("%s: exit %d, stderr %q; want exit %d and %q", tc.name, r.code, r.stderr, tc.code, tc.want)
		}
		if tc.code == 1 && strings.Count(r.stderr, "\n") != 1 {
			t.Errorf("%s: want one line of error, got %q", tc.name, r.stderr)
		}
	}
	for _, args := range [][]string{{"cache", "warm", "--help"}, {"help", "cache", "warm"}} {
		if out := e.must("", args...); !strings.Contains(out, "Usage: pullsecret cache warm") || !strings.Contains(out, "warm IMAGE DIGEST SIZE cached|already cached") {
			t.Errorf("%q: %s", args, out)
		}
	}
	r := e.run("", "cache", "warm", "--config", offFile, "--project", "acme", image)
	if r.code != 1 || !strings.Contains(r.stderr, "the cache is off") {
		t.Errorf("cache off: exit %d, stderr %q", r.code, r.stderr)
	}

	// Several images: the good one is warmed, the bad one reported, and
	// the exit status says not all went well.
	r = e.run("", append(slices.Clone(warm), "--project", "acme", f.ref("v9"), image)...)
	if r.code != 1 || !strings.Contains(r.stderr, `pullsecret: warm `+f.ref("v9")+`: tag "v9" not found`) ||
		!strings.HasSuffix(r.stderr, "pullsecret: 1 of 2 images could not be warmed: "+f.ref("v9")+"\n") {
		t.Errorf("one bad image of two: exit %d, stderr %q", r.code, r.stderr)
	}
	if got, summary := warmLines(t, r.stdout, image); len(got) != 9 || !strings.HasPrefix(summary, "warmed 1 image ") {
		t.Errorf("one bad image of two: stdout %q", r.stdout)
	}
	if n := f.blobGETs(); n != 6 {
		t.Errorf("the upstream sent %d blobs; want each of the 6 once", n)
	}
}

// TestWarmImageNames maps IMAGE arguments onto the proxy's path-prefix
// form.
func TestWarmImageNames(t *testing.T) {
	t.Parallel()
	aliases := map[string]string{"up": "registry.example.com:5000", "hub": "docker.io"}
	for _, tc := range []struct {
		arg                      string
		key, upstream, repo, ref string
	}{
		{"registry.example.com:5000/team/app:1.0", "registry.example.com:5000", "registry.example.com:5000", "team/app", "1.0"},
		{"ghcr.io/x/y@sha256:" + strings.Repeat("a", 64), "ghcr.io", "ghcr.io", "x/y", "sha256:" + strings.Repeat("a", 64)},
		{"alpine", "index.docker.io", "docker.io", "library/alpine", "latest"},
		{"up/team/app:2", "up", "registry.example.com:5000", "team/app", "2"},
		{"hub/alpine:3", "hub", "docker.io", "library/alpine", "3"},
	} {
		img, err := parseWarmImage(tc.arg, aliases)
		if err != nil {
			t.Errorf("%s: %v", tc.arg, err)
			continue
		}
		if img.key != tc.key || img.upstream != tc.upstream || img.repo != tc.repo || img.ref != tc.ref {
			t.Errorf("%s: got %+v", tc.arg, img)
		}
	}
}

// TestWarmRecordsMerge: a warm-up's access records are merged into the
// file as it is at the end, so a record written meanwhile by a server
// survives, and a revocation reaches the file.
func TestWarmRecordsMerge(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "access.json")
	now := time.Now()
	w := newWarmRecords()
	proved := accessKey("acme", "team/app")
	refused := accessKey("acme", "team/private")
	if err := w.Record(ctx, proved, now); err != nil {
		t.Fatal(err)
	}
	w.Revoke(ctx, refused)

	// Meanwhile, a server wrote its own records.
	srv := mustOpenRecords(t, path)
	srv.Record(ctx, refused, now.Add(-time.Minute))
	other := accessKey("other", "team/app")
	srv.Record(ctx, other, now.Add(-time.Minute))
	srv.Close()

	if err := w.persist(path); err != nil {
		t.Fatal(err)
	}
	got := mustOpenRecords(t, path)
	defer got.Close()
	for _, tc := range []struct {
		name string
		k    cache.AccessKey
		want bool
	}{{"proved", proved, true}, {"refused", refused, false}, {"other", other, true}} {
		if _, ok, _ := got.Last(ctx, tc.k); ok != tc.want {
			t.Errorf("%s: recorded %v, want %v", tc.name, ok, tc.want)
		}
	}
}

func accessKey(project, repo string) cache.AccessKey {
	return cache.AccessKey{Project: project, Upstream: "registry.example.com", Repo: repo}
}

func mustOpenRecords(t *testing.T, path string) *cache.MemoryAccessRecords {
	t.Helper()
	m, err := cache.OpenAccessRecords(path)
	if err != nil {
		t.Fatal(err)
	}
	return m
}
