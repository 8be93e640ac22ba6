package proxy

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/pullsecret/pullsecret/registry"
)

// TestPullMultiUpstream pulls images from two private upstreams (htpasswd
// and token auth) through one proxy with ggcr, as a real client does: a
// 401 challenge, the token flow with the project token as Basic password,
// then manifests and layers. Every digest is verified by the client.
func TestPullMultiUpstream(t *testing.T) {
	t.Parallel()
	basicUp := pxUpstream(t, false)
	tokenUp := pxUpstream(t, true)
	f := newPX(t, withAliases(map[string]string{"basic": basicUp.Host(), "tok": tokenUp.Host()}))
	f.addSecret("acme", "basic", basicUp.Host(), pxUser, pxCanary)
	f.addSecret("acme", "tok", tokenUp.Host(), pxUser, pxCanary)
	imgA, err := basicUp.SeedRandom(f.ctx, "team/app", "v1", registry.Layers(2), registry.LayerSize(64<<10))
	if err != nil {
		t.Fatal(err)
	}
	imgB, err := tokenUp.SeedRandom(f.ctx, "other/tool", "v2", registry.Layers(1), registry.LayerSize(32<<10))
	if err != nil {
		t.Fatal(err)
	}
	tok := f.token("acme", ScopePull)

	for _, tc := range []struct {
		ref  string
		want v1.Image
	}{
		{"basic/team/app:v1", imgA},
		{"tok/other/tool:v2", imgB},
	} {
		t.Run(tc.ref, func(t *testing.T) {
			img, err := remote.Image(f.ref(tc.ref), f.client(tok)...)
			if err != nil {
				t.Fatalf("pull %s: %v", tc.ref, err)
			}
			got, _ := img.Digest()
			want, _ := tc.want.Digest()
			if got != want {
				t.Fatalf("digest %s, want %s", got, want)
			}
			layers, err := img.Layers()
			if err != nil {
				t.Fatal(err)
			}
			for _, l := range layers {
				rc, err := l.Compressed() // verifies the digest on EOF
				if err != nil {
					t.Fatal(err)
				}
				if _, err := io.Copy(io.Discard, rc); err != nil {
					t.Fatalf("layer: %v", err)
				}
				rc.Close()
			}
		})
	}

	// The raw host:port form of the first path component works at the HTTP
	// level (reference parsers refuse a port there, hence aliases).
	d, _ := imgA.Digest()
	resp := f.get("/v2/"+basicUp.Host()+"/team/app/manifests/v1", tok, "Accept", string(types.OCIManifestSchema1))
	body := f.readAll(resp)
	if resp.StatusCode != 200 || resp.Header.Get("Docker-Content-Digest") != d.String() {
		t.Fatalf("host:port form: %d %s %s", resp.StatusCode, resp.Header.Get("Docker-Content-Digest"), body)
	}

	// The upstream token is cached and shared: many pulls, one token grant
	// per (credential, scope).
	for i := 0; i < 3; i++ {
		if _, err := remote.Image(f.ref("tok/other/tool:v2"), f.client(tok)...); err != nil {
			t.Fatal(err)
		}
	}
	grants := 0
	for _, r := range tokenUp.Requests() {
		if r.Path == "/token" {
			grants++
		}
	}
	if grants != 1 {
		t.Errorf("upstream token endpoint called %d times, want 1 (tokens cached per upstream, credential, scope)", grants)
	}

	// Project isolation: project beta has no secret for these upstreams.
	other := f.token("beta", ScopePull)
	if _, err := remote.Image(f.ref("basic/team/app:v1"), f.client(other)...); err == nil {
		t.Fatal("project beta pulled through project acme's secret")
	}
	resp = f.get("/v2/"+basicUp.Host()+"/team/app/manifests/v1", other)
	body = f.readAll(resp)
	if resp.StatusCode != http.StatusForbidden {
		t.Fatalf("beta: %d %s", resp.StatusCode, body)
	}
}

// TestMirrorNamespace serves containerd's mirror form /v2/<repo>/...?ns=.
func TestMirrorNamespace(t *testing.T) {
	t.Parallel()
	up := pxUpstream(t, false)
	f := newPX(t)
	f.addSecret("acme", "up", up.Host(), pxUser, pxCanary)
	img, err := up.SeedRandom(f.ctx, "acme/app", "v1")
	if err != nil {
		t.Fatal(err)
	}
	d, _ := img.Digest()
	m, _ := img.Manifest()
	tok := f.token("acme", ScopePull)

	resp := f.get("/v2/acme/app/manifests/v1?ns="+up.Host(), tok, "Accept", string(types.OCIManifestSchema1))
	body := f.readAll(resp)
	if resp.StatusCode != 200 || resp.Header.Get("Docker-Content-Digest") != d.String() {
		t.Fatalf("ns manifest: %d %s", resp.StatusCode, body)
	}
	resp = f.get("/v2/acme/app/blobs/"+m.Layers[0].Digest.String()+"?ns="+up.Host(), tok)
	blob := f.readAll(resp)
	if resp.StatusCode != 200 || sha(blob) != m.Layers[0].Digest.Hex {
		t.Fatalf("ns blob: %d", resp.StatusCode)
	}
	// containerd's token flow: it asks for its own scope (the path) and
	// the challenge's (ns-qualified); the JWT then works on the mirror path.
	tr := f.get("/token?service=pullsecret&scope=repository:acme/app:pull&scope=repository:"+up.Host()+"/acme/app:pull", tok)
	var tj struct {
		Token string `json:"token"`
	}
	if err := json.Unmarshal([]byte(f.readAll(tr)), &tj); err != nil || tj.Token == "" {
		t.Fatalf("token: %d %v", tr.StatusCode, err)
	}
	req, _ := http.NewRequest(http.MethodGet, f.hs.URL+"/v2/acme/app/manifests/v1?ns="+up.Host(), nil)
	req.Header.Set("Authorization", "Bearer "+tj.Token)
	req.Header.Set("Accept", string(types.OCIManifestSchema1))
	jr, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if body := f.readAll(jr); jr.StatusCode != 200 {
		t.Fatalf("ns manifest with a JWT: %d %s", jr.StatusCode, body)
	}
	// An ns that is not on the allowlist reaches nothing.
	resp = f.get("/v2/acme/app/manifests/v1?ns=ghcr.io", tok)
	body = f.readAll(resp)
	if code, _ := errorCode(body); resp.StatusCode != 403 || code != CodeDenied {
		t.Fatalf("unlisted ns: %d %s", resp.StatusCode, body)
	}
	// Without a token: the challenge names the ns-qualified scope.
	resp = f.get("/v2/acme/app/manifests/v1?ns="+up.Host(), "")
	f.readAll(resp)
	if resp.StatusCode != 401 || !strings.Contains(resp.Header.Get("WWW-Authenticate"), `scope="repository:`+up.Host()+`/acme/app:pull"`) {
		t.Fatalf("challenge: %d %q", resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
	}
}

func sha(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:])
}

// TestBlobRangeHeadTagsReferrers covers HEAD, Range (206 pass-through),
// tags with pagination and referrers (with the tag-schema fallback).
func TestBlobRangeHeadTagsReferrers(t *testing.T) {
	t.Parallel()
	up := pxUpstream(t, true)
	f := newPX(t, withAliases(map[string]string{"up": up.Host()}))
	f.addSecret("acme", "up", up.Host(), pxUser, pxCanary)
	for _, tag := range []string{"a", "b", "c"} {
		if _, err := up.SeedRandom(f.ctx, "app", tag, registry.RandSeed(7)); err != nil {
			t.Fatal(err)
		}
	}
	d, err := up.SeedBlob(f.ctx, "app", 100000, registry.RandSeed(3))
	if err != nil {
		t.Fatal(err)
	}
	rc, _ := registry.RandomBlob(3, 100000).Compressed()
	all, _ := io.ReadAll(rc)
	tok := f.token("acme", ScopePull)
	blobPath := "/v2/up/app/blobs/" + d.String()

	t.Run("head", func(t *testing.T) {
		resp := f.do(http.MethodHead, blobPath, tok, nil)
		f.readAll(resp)
		if resp.StatusCode != 200 || resp.ContentLength != 100000 || resp.Header.Get("Docker-Content-Digest") != d.String() {
			t.Fatalf("HEAD: %d len %d", resp.StatusCode, resp.ContentLength)
		}
	})
	for _, tc := range []struct {
		rng        string
		start, end int
	}{
		{"bytes=10-99", 10, 100},
		{"bytes=99990-", 99990, 100000},
		{"bytes=-5", 99995, 100000},
	} {
		t.Run(tc.rng, func(t *testing.T) {
			resp := f.get(blobPath, tok, "Range", tc.rng)
			got := f.readAll(resp)
			if resp.StatusCode != http.StatusPartialContent {
				t.Fatalf("status %d", resp.StatusCode)
			}
			if got != string(all[tc.start:tc.end]) {
				t.Fatalf("wrong bytes for %s", tc.rng)
			}
			want := fmt.Sprintf("bytes %d-%d/100000", tc.start, tc.end-1)
			if cr := resp.Header.Get("Content-Range"); cr != want {
				t.Fatalf("Content-Range %q, want %q", cr, want)
			}
		})
	}
	t.Run("full", func(t *testing.T) {
		resp := f.get(blobPath, tok)
		if got := f.readAll(resp); got != string(all) {
			t.Fatal("wrong bytes")
		}
	})
	t.Run("unknown blob", func(t *testing.T) {
		resp := f.get("/v2/up/app/blobs/sha256:"+strings.Repeat("0", 64), tok)
		body := f.readAll(resp)
		if code, _ := errorCode(body); resp.StatusCode != 404 || code != CodeBlobUnknown {
			t.Fatalf("%d %s", resp.StatusCode, body)
		}
	})
	t.Run("tags", func(t *testing.T) {
		resp := f.get("/v2/up/app/tags/list?n=2", tok)
		body := f.readAll(resp)
		var l struct {
			Name string   `json:"name"`
			Tags []string `json:"tags"`
		}
		json.Unmarshal([]byte(body), &l)
		if resp.StatusCode != 200 || l.Name != "up/app" || strings.Join(l.Tags, ",") != "a,b" {
			t.Fatalf("tags page 1: %d %s", resp.StatusCode, body)
		}
		link := resp.Header.Get("Link")
		if !strings.HasPrefix(link, "</v2/up/app/tags/list?") || !strings.Contains(link, "last=b") {
			t.Fatalf("Link %q", link)
		}
		next := link[1:strings.IndexByte(link, '>')]
		resp = f.get(next, tok)
		body = f.readAll(resp)
		json.Unmarshal([]byte(body), &l)
		if strings.Join(l.Tags, ",") != "c" {
			t.Fatalf("tags page 2: %s", body)
		}
	})
	t.Run("referrers", func(t *testing.T) {
		subject, err := remote.Image(f.ref("up/app:a"), f.client(tok)...)
		if err != nil {
			t.Fatal(err)
		}
		sd, _ := subject.Digest()
		resp := f.get("/v2/up/app/referrers/"+sd.String(), tok)
		body := f.readAll(resp)
		if resp.StatusCode != 200 || !strings.Contains(body, `"manifests":[]`) {
			t.Fatalf("empty referrers: %d %s", resp.StatusCode, body)
		}
		// An artifact with a subject, pushed directly. distribution v3 has
		// no referrers API: the client keeps the sha256-<hex> tag index,
		// which the proxy falls back to.
		desc := v1.Descriptor{MediaType: types.OCIManifestSchema1, Digest: sd, Size: mustSize(t, subject)}
		art := mutate.Subject(mutate.MediaType(empty.Image, types.OCIManifestSchema1), desc).(v1.Image)
		art = mutate.ConfigMediaType(art, "application/vnd.example.sbom")
		aref, _ := name.ParseReference(up.Ref("app", "sbom"))
		if err := remote.Write(aref, art, pxDirect(f.ctx)...); err != nil {
			t.Fatal(err)
		}
		ad, _ := art.Digest()
		fallback := mutate.AppendManifests(mutate.IndexMediaType(empty.Index, types.OCIImageIndex), mutate.IndexAddendum{
			Add:        art,
			Descriptor: v1.Descriptor{MediaType: types.OCIManifestSchema1, Digest: ad, ArtifactType: "application/vnd.example.sbom"},
		})
		fref, _ := name.ParseReference(up.Ref("app", "sha256-"+sd.Hex))
		if err := remote.WriteIndex(fref, fallback, pxDirect(f.ctx)...); err != nil {
			t.Fatal(err)
		}
		resp = f.get("/v2/up/app/referrers/"+sd.String(), tok)
		body = f.readAll(resp)
		var idx v1.IndexManifest
		if err := json.Unmarshal([]byte(body), &idx); err != nil || len(idx.Manifests) != 1 {
			t.Fatalf("referrers: %d %s", resp.StatusCode, body)
		}
		resp = f.get("/v2/up/app/referrers/"+sd.String()+"?artifactType=application/other", tok)
		body = f.readAll(resp)
		if resp.Header.Get("OCI-Filters-Applied") != "artifactType" || !strings.Contains(body, `"manifests":[]`) {
			t.Fatalf("filtered referrers: %s", body)
		}
	})
}

func mustSize(t *testing.T, img v1.Image) int64 {
	n, err := img.Size()
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestManifestLimits: the size limit and digest checks of manifests.
func TestManifestLimits(t *testing.T) {
	t.Parallel()
	up := pxUpstream(t, false)
	f := newPX(t, withAliases(map[string]string{"up": up.Host()}), func(c *Config) { c.MaxManifestSize = 200 })
	f.addSecret("acme", "up", up.Host(), pxUser, pxCanary)
	if _, err := up.SeedRandom(f.ctx, "app", "v1"); err != nil {
		t.Fatal(err)
	}
	tok := f.token("acme", ScopePull)
	for _, m := range []string{http.MethodGet, http.MethodHead} {
		resp := f.do(m, "/v2/up/app/manifests/v1", tok, nil)
		body := f.readAll(resp)
		if resp.StatusCode != http.StatusBadGateway {
			t.Fatalf("%s: %d %s", m, resp.StatusCode, body)
		}
		if m == http.MethodGet {
			if code, msg := errorCode(body); code != CodeManifestInvalid || !strings.Contains(msg, "too large") {
				t.Fatalf("%s", body)
			}
		}
	}
}

// TestBadNames: NAME_INVALID and friends, before any upstream work.
func TestBadNames(t *testing.T) {
	t.Parallel()
	f := newPX(t)
	tok := f.token("acme", ScopePull)
	for _, tc := range []struct {
		path string
		code string
	}{
		{"/v2/ghcr.io/../etc/manifests/v1", CodeNameInvalid},
		{"/v2/ghcr.io/Acme/App/manifests/v1", CodeNameInvalid},
		{"/v2/ghcr.io//app/manifests/v1", CodeNameInvalid},
		{"/v2/ghcr.io/app%2F..%2Fx/manifests/v1", CodeNameInvalid},
		{"/v2/ghcr.io/a/manifests/bad:digest", CodeDigestInvalid},
		{"/v2/ghcr.io/a/blobs/notadigest", CodeDigestInvalid},
		{"/v2/alpine/manifests/latest", CodeNameInvalid},
		{"/v2/evil.example.com/app/manifests/v1", CodeDenied},
		{"/v2/169.254.169.254/latest/manifests/v1", CodeDenied},
		{"/v2/_catalog", CodeUnsupported},
	} {
		resp := f.get(tc.path, tok)
		body := f.readAll(resp)
		if code, _ := errorCode(body); code != tc.code {
			t.Errorf("%s: %d %s, want %s", tc.path, resp.StatusCode, body, tc.code)
		}
	}
}

// TestPingAndOps: /v2/ challenge, health, readiness, metrics.
func TestPingAndOps(t *testing.T) {
	t.Parallel()
	f := newPX(t)
	resp := f.get("/v2/", "")
	f.readAll(resp)
	if resp.StatusCode != 401 || !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Bearer realm=") {
		t.Fatalf("ping without auth: %d %q", resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
	}
	tok := f.token("acme", ScopePull)
	resp = f.get("/v2/", tok)
	f.readAll(resp)
	if resp.StatusCode != 200 || resp.Header.Get("Docker-Distribution-API-Version") != "registry/2.0" {
		t.Fatalf("ping: %d", resp.StatusCode)
	}
	resp = f.get("/v2/", "pst_wrong")
	f.readAll(resp)
	if resp.StatusCode != 401 {
		t.Fatalf("ping with a bad token: %d", resp.StatusCode)
	}
	for _, p := range []string{"/healthz", "/readyz"} {
		resp := f.get(p, "")
		f.readAll(resp)
		if resp.StatusCode != 200 {
			t.Fatalf("%s: %d", p, resp.StatusCode)
		}
	}
	resp = f.get("/metrics", "")
	body := f.readAll(resp)
	for _, want := range []string{"pullsecret_http_requests_total", "pullsecret_auth_failures_total", `route="ping"`, "go_goroutines"} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	if !strings.Contains(f.logs.String(), "request_id=") {
		t.Error("no request log line")
	}
}
