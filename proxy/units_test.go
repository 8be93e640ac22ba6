package proxy

import (
	"bytes"
	"errors"
	"io"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

func TestParseConfig(t *testing.T) {
	t.Parallel()
	cfg, err := ParseConfig([]byte(`
listen: 0.0.0.0:5000
external_url: https://proxy.example.com:5000/
allow_private_upstreams: [127.0.0.1, 10.0.0.0/8, registry.internal]
insecure_upstreams: [Registry.Internal:5000]
aliases: {hub: index.docker.io, gh: ghcr.io}
projects:
  acme:
    aliases: {mine: registry.example.com:5000}
token_ttl: 10m
max_manifest_size: 8MiB
verify_blobs: false
upstream: {dial_timeout: 3s, ca_files: []}
log: {level: DEBUG, format: json}
`))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Listen != "0.0.0.0:5000" || cfg.ExternalURL != "https://proxy.example.com:5000" ||
		cfg.Aliases["hub"] != "docker.io" || cfg.Projects["acme"].Aliases["mine"] != "registry.example.com:5000" ||
		cfg.InsecureUpstreams[0] != "registry.internal:5000" || cfg.TokenTTL != 10*time.Minute ||
		cfg.MaxManifestSize != 8<<20 || cfg.VerifyBlobs || !DefaultConfig().VerifyBlobs || cfg.Upstream.DialTimeout != 3*time.Second ||
		cfg.Upstream.RequestTimeout != DefaultUpstreamRequestTimeout || cfg.Log.Level != "debug" || cfg.Log.Format != "json" {
		t.Fatalf("%+v", cfg)
	}
	if len(cfg.AllowPrivateUpstreams.Prefixes) != 2 || cfg.AllowPrivateUpstreams.Hosts[0] != "registry.internal" {
		t.Fatalf("allow_private_upstreams: %+v", cfg.AllowPrivateUpstreams)
	}
	if c, err := ParseConfig([]byte("allow_private_upstreams: true\n")); err != nil || !c.AllowPrivateUpstreams.AllowPrivate {
		t.Fatalf("bool form: %v %+v", err, c.AllowPrivateUpstreams)
	}
	if c, err := ParseConfig(nil); err != nil || c.Listen != DefaultListen || c.MaxManifestSize != DefaultMaxManifestSize {
		t.Fatalf("empty config: %v %+v", err, c)
	}
	for _, bad := range []struct{ yaml, want string }{
		{"listn: x", "field listn not found"},
		{"listen: nope", "listen"},
		{"tls_cert: a", "tls_cert and tls_key"},
		{"external_url: ftp://x", "external_url"},
		{"external_url: https://x/path", "path"},
		{"allow_private_upstreams: maybe", "allow_private_upstreams"},
		{"allow_private_upstreams: [not a host!]", "allow_private_upstreams[0]"},
		{"aliases: {Hub: docker.io}", "alias"},
		{"aliases: {my.alias: docker.io}", "alias"},
		{"aliases: {hub: 'https://x/y'}", "aliases.hub"},
		{"projects: {Bad_Name: {}}", "projects"},
		{"max_manifest_size: 4 parsecs", "unknown unit"},
		{"max_manifest_size: 1GiB", "at most 64MiB"},
		{"log: {level: loud}", "log.level"},
		{"upstream: {dial_timeout: -1s}", "negative"},
		{"token_ttl: 1s", "token_ttl"},
		{"a: 1\n---\nb: 2", "field a not found"},
	} {
		_, err := ParseConfig([]byte(bad.yaml))
		if err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("%q: error %v, want it to mention %q", bad.yaml, err, bad.want)
		}
	}
}

func TestParseRoute(t *testing.T) {
	t.Parallel()
	d := "sha256:" + strings.Repeat("a", 64)
	for _, tc := range []struct {
		target          string
		kind            routeKind
		name, key, rest string
		ref             string
		ns              bool
		code            string
	}{
		{target: "/v2/ghcr.io/acme/app/manifests/v1", kind: routeManifest, name: "ghcr.io/acme/app", key: "ghcr.io", rest: "acme/app", ref: "v1"},
		{target: "/v2/reg.example.com:5000/a/manifests/" + d, kind: routeManifest, name: "reg.example.com:5000/a", key: "reg.example.com:5000", rest: "a", ref: d},
		{target: "/v2/hub/alpine/blobs/" + d, kind: routeBlob, name: "hub/alpine", key: "hub", rest: "alpine", ref: d},
		{target: "/v2/hub/x/blobs/uploads/", kind: routeUploadStart, name: "hub/x", key: "hub", rest: "x"},
		{target: "/v2/hub/x/blobs/uploads/abc_-", kind: routeUpload, name: "hub/x", key: "hub", rest: "x", ref: "abc_-"},
		{target: "/v2/hub/blobs/uploads/blobs/" + d, kind: routeBlob, name: "hub/blobs/uploads", key: "hub", rest: "blobs/uploads", ref: d},
		{target: "/v2/hub/manifests/manifests/v1", kind: routeManifest, name: "hub/manifests", key: "hub", rest: "manifests", ref: "v1"},
		{target: "/v2/hub/x/tags/list", kind: routeTags, name: "hub/x", key: "hub", rest: "x"},
		{target: "/v2/hub/x/referrers/" + d, kind: routeReferrers, name: "hub/x", key: "hub", rest: "x", ref: d},
		{target: "/v2/library/alpine/manifests/3?ns=docker.io", kind: routeManifest, name: "docker.io/library/alpine", key: "docker.io", rest: "library/alpine", ref: "3", ns: true},
		{target: "/v2/proxy.local/a/b/manifests/3?ns=proxy.local", kind: routeManifest, name: "proxy.local/a/b", key: "proxy.local", rest: "a/b", ref: "3"},
		{target: "/v2/hub/../x/manifests/v1", code: CodeNameInvalid},
		{target: "/v2/hub/a//b/manifests/v1", code: CodeNameInvalid},
		{target: "/v2/hub/A/manifests/v1", code: CodeNameInvalid},
		{target: "/v2/hub/a-/manifests/v1", code: CodeNameInvalid},
		{target: "/v2/hub/a%2fb/manifests/v1", code: CodeNameInvalid},
		{target: "/v2/Hub/a/manifests/v1", code: CodeNameInvalid},
		{target: "/v2/alpine/manifests/v1", code: CodeNameInvalid},
		{target: "/v2/hub/a/manifests/-bad", code: "TAG_INVALID"},
		{target: "/v2/hub/a/blobs/sha256:short", code: CodeDigestInvalid},
		{target: "/v2/hub/a/unknown/x", code: CodeUnsupported},
		{target: "/v2/a/manifests/v1?ns=bad/ns", code: CodeNameInvalid},
		{target: "/v2/hub/" + strings.Repeat("a/", 130) + "a/manifests/v1", code: CodeNameInvalid},
	} {
		r := httptest.NewRequest("GET", tc.target, nil)
		rt, err := parseRoute(r, "proxy.local")
		if tc.code != "" {
			if err == nil || err.Code != tc.code {
				t.Errorf("%s: got %v, want %s", tc.target, err, tc.code)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", tc.target, err)
			continue
		}
		if rt.kind != tc.kind || rt.name != tc.name || rt.key != tc.key || rt.rest != tc.rest || rt.ref != tc.ref || rt.ns != tc.ns {
			t.Errorf("%s: %+v", tc.target, rt)
		}
	}
}

func TestAllowlistAndDockerHub(t *testing.T) {
	t.Parallel()
	a := &Allowlist{Hosts: map[string]bool{"ghcr.io": true, "docker.io": true, "127.0.0.1:5000": true}, Aliases: map[string]string{"hub": "docker.io"}}
	for key, want := range map[string]string{
		"ghcr.io": "ghcr.io", "hub": "docker.io", "index.docker.io": "docker.io",
		"127.0.0.1:5000": "127.0.0.1:5000", "quay.io": "", "127.0.0.1": "", "ghcr.io:443": "",
	} {
		got, ok := a.Upstream(key)
		if got != want || ok != (want != "") {
			t.Errorf("%s -> %q %v, want %q", key, got, ok, want)
		}
	}
	if upstreamRepo("docker.io", "alpine") != "library/alpine" || upstreamRepo("docker.io", "x/y") != "x/y" || upstreamRepo("ghcr.io", "alpine") != "alpine" {
		t.Error("Docker Hub library/ rule")
	}
}

func TestParseRange(t *testing.T) {
	t.Parallel()
	for h, want := range map[string]*Range{
		"bytes=0-99":   {0, 99},
		"bytes=100-":   {100, -1},
		"bytes=-20":    {-20, -1},
		"bytes=5-4":    nil,
		"bytes=0-1,5-": nil,
		"items=0-1":    nil,
		"bytes=-0":     nil,
		"bytes=a-b":    nil,
		"":             nil,
	} {
		got, ok := ParseRange(h)
		if (want == nil) != !ok || (ok && got != *want) {
			t.Errorf("%q: %v %v", h, got, ok)
		}
		if ok {
			if back, _ := ParseRange(got.String()); back != got {
				t.Errorf("%q round trip: %v", h, back)
			}
		}
	}
	if c, ok := parseContentRange("bytes 10-19/100"); !ok || c != (ContentRange{10, 19, 100}) || c.String() != "bytes 10-19/100" {
		t.Errorf("%v %v", c, ok)
	}
	for _, bad := range []string{"bytes 10-5/100", "bytes 0-100/100", "bits 0-1/2", "bytes 0-1"} {
		if _, ok := parseContentRange(bad); ok {
			t.Errorf("%q accepted", bad)
		}
	}
}

// oneByteReader returns one byte per Read, to exercise the verifier's
// bookkeeping.
type oneByteReader struct{ r io.Reader }

func (o oneByteReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	return o.r.Read(p[:1])
}

func TestVerifier(t *testing.T) {
	t.Parallel()
	data := bytes.Repeat([]byte("0123456789"), 30000)
	good, _ := v1.NewHash(digestOf(data))
	bad, _ := v1.NewHash(digestOf([]byte("other")))
	for _, tc := range []struct {
		name  string
		want  v1.Hash
		size  int64
		slow  bool
		fails bool
	}{
		{"sized ok", good, int64(len(data)), false, false},
		{"unsized ok", good, -1, false, false},
		{"unsized ok, byte by byte", good, -1, true, false},
		{"sized mismatch", bad, int64(len(data)), false, true},
		{"unsized mismatch", bad, -1, false, true},
		{"unsized mismatch, byte by byte", bad, -1, true, true},
		{"short body", good, int64(len(data)) + 1, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var r io.Reader = bytes.NewReader(data)
			if tc.slow {
				r = oneByteReader{r}
			}
			v, err := newVerifier(io.NopCloser(r), tc.want, tc.size)
			if err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(v)
			if tc.fails {
				if err == nil {
					t.Fatal("no error")
				}
				// The whole body is never handed out.
				if len(got) >= len(data) {
					t.Fatalf("handed out %d of %d bytes before failing", len(got), len(data))
				}
				if tc.want == bad && !errors.Is(err, ErrDigestMismatch) {
					t.Fatalf("error %v", err)
				}
				return
			}
			if err != nil || !bytes.Equal(got, data) {
				t.Fatalf("%v, %d bytes", err, len(got))
			}
		})
	}
}

func TestSameDomain(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		a, b string
		ok   bool
	}{
		{"index.docker.io", "auth.docker.io", true},
		{"registry.gitlab.com", "gitlab.com", true},
		{"ghcr.io", "ghcr.io", true},
		{"ghcr.io", "evil.io", false},
		{"foo.github.io", "bar.github.io", false}, // github.io is a public suffix
		{"127.0.0.1", "127.0.0.1", true},
		{"127.0.0.1", "localhost", false},
		{"10.0.0.1", "10.0.0.2", false},
		{"registry", "auth", false},
		{"reg.example.co.uk", "auth.example.co.uk", true},
		{"reg.example.co.uk", "other.co.uk", false},
	} {
		if got := sameDomain(tc.a, tc.b); got != tc.ok {
			t.Errorf("sameDomain(%s, %s) = %v", tc.a, tc.b, got)
		}
	}
}

func TestRedact(t *testing.T) {
	t.Parallel()
	for _, in := range []string{
		`Authorization: Bearer eyJhbGciOiJFUzI1NiJ9.payload.sig`,
		`Basic cm9ib3Q6Y2FuYXJ5LXB3`,
		`{"token":"abcdefsecret","expires_in":300}`,
		`password=abcdefsecret&user=x`,
		`https://user:abcdefsecret@host/v2/`,
		`GET https://s3/bucket?X-Amz-Signature=abcdefsecret&x=1`,
		`token pst_abcdefsecret0123 rejected`,
	} {
		out := redact(in)
		if strings.Contains(out, "abcdefsecret") || strings.Contains(out, "eyJhbGciOiJFUzI1NiJ9") || strings.Contains(out, "cm9ib3Q6Y2FuYXJ5LXB3") {
			t.Errorf("redact(%q) = %q", in, out)
		}
	}
}

func TestUploadSealer(t *testing.T) {
	t.Parallel()
	u := newUploadSealer(nil)
	now := time.Now()
	id := u.seal(uploadState{URL: "https://up/v2/x/blobs/uploads/1?_state=s", Project: "p", Name: "n", Upstream: "up", Expires: now.Add(time.Hour).Unix()})
	st, ok := u.open(id, now)
	if !ok || st.URL != "https://up/v2/x/blobs/uploads/1?_state=s" {
		t.Fatal("round trip")
	}
	if strings.Contains(id, "up/v2") {
		t.Fatal("the upstream URL is readable in the id")
	}
	if _, ok := u.open(id, now.Add(2*time.Hour)); ok {
		t.Fatal("expired id accepted")
	}
	if _, ok := newUploadSealer(nil).open(id, now); ok {
		t.Fatal("another key opened the id")
	}
	// Replicas sharing the cluster secret open each other's ids.
	shared := DeriveKey([]byte("cluster secret"), "upload ids")
	id = newUploadSealer(shared).seal(uploadState{URL: "https://up/u", Expires: now.Add(time.Hour).Unix()})
	if st, ok := newUploadSealer(shared).open(id, now); !ok || st.URL != "https://up/u" {
		t.Fatal("a replica with the same key did not open the id")
	}
	b := []byte(id)
	b[len(b)/2] ^= 1
	if _, ok := u.open(string(b), now); ok {
		t.Fatal("tampered id accepted")
	}
}
