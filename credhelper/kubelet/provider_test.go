package kubelet

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pullsecret/pullsecret/credhelper"
	"github.com/pullsecret/pullsecret/secret"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	cpv1 "k8s.io/kubelet/pkg/apis/credentialprovider/v1"
)

// kubeletDecode decodes a response the way kubelet does: its scheme with
// the credentialprovider v1 types and a strict codec factory.
func kubeletDecode(t *testing.T, data []byte) *cpv1.CredentialProviderResponse {
	t.Helper()
	scheme := runtime.NewScheme()
	if err := cpv1.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	codecs := serializer.NewCodecFactory(scheme, serializer.EnableStrict)
	obj, gvk, err := codecs.UniversalDeserializer().Decode(data, nil, nil)
	if err != nil {
		t.Fatalf("kubelet cannot decode our response: %v\n%s", err, data)
	}
	if gvk.Kind != ResponseKind || gvk.GroupVersion().String() != ProviderAPIVersion {
		t.Fatalf("kubelet decoded %v", gvk)
	}
	resp, ok := obj.(*cpv1.CredentialProviderResponse)
	if !ok {
		t.Fatalf("kubelet decoded a %T", obj)
	}
	return resp
}

func TestKubeletStrictDecoderIsStrict(t *testing.T) {
	t.Parallel()
	// The decoder the tests use refuses what kubelet refuses, so that a
	// response it accepts is one kubelet accepts.
	scheme := runtime.NewScheme()
	if err := cpv1.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	codecs := serializer.NewCodecFactory(scheme, serializer.EnableStrict)
	for _, bad := range []string{
		`{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Image","extra":1}`,
		`{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Image","auth":{"a":{"username":"u","password":"p","token":"x"}}}`,
		`{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Image","cacheDuration":"5 minutes"}`,
	} {
		if _, _, err := codecs.UniversalDeserializer().Decode([]byte(bad), nil, nil); err == nil {
			t.Errorf("strict decoder accepted %s", bad)
		}
	}
}

func TestMatchImage(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		pattern, image string
		want           bool
	}{
		// Kubelet's documented examples.
		{"*.docker.io", "blah.docker.io", true},
		{"*.docker.io", "not.right.io", false},
		{"123456789.dkr.ecr.us-east-1.amazonaws.com", "123456789.dkr.ecr.us-east-1.amazonaws.com/app:1", true},
		{"*.azurecr.io", "acme.azurecr.io/team/app", true},
		{"*.azurecr.io", "azurecr.io/team/app", false},
		{"gcr.io", "gcr.io/project/app", true},
		{"*.*.registry.io", "a.b.registry.io/x", true},
		{"*.*.registry.io", "a.registry.io/x", false},
		{"registry.io:8080/path", "registry.io:8080/path/app", true},
		{"k8s.*.io", "k8s.gcr.io/pause", true},
		{"k8s.*", "k8s.io/pause", true},
		{"app*.k8s.io", "app1.k8s.io/x", true},
		{"app*.k8s.io", "web.k8s.io/x", false},
		// Host part counts: a glob matches one part only.
		{"*.io", "k8s.gcr.io/x", false},
		{"*", "localhost/x", true},
		{"*", "registry.io/x", false},
		{"ghcr.io", "sub.ghcr.io/x", false},
		{"ghcr.io", "ghcr.io", true},
		// Ports must be equal; no glob in ports.
		{"registry.io", "registry.io:5000/x", false},
		{"registry.io:5000", "registry.io/x", false},
		{"registry.io:5000", "registry.io:5000/x", true},
		{"127.0.0.1:5000", "127.0.0.1:5000/team/app:v1", true},
		{"127.0.0.1:5000", "127.0.0.1:5001/team/app:v1", false},
		{"*.0.0.1:5000", "127.0.0.1:5000/team/app", true},
		{"[::1]:5000", "[::1]:5000/team/app", true},
		// Paths are plain prefixes: no globs, no component boundary.
		{"ghcr.io/acme", "ghcr.io/acme/agent:1.4", true},
		{"ghcr.io/acme", "ghcr.io/acmeb/agent", true},
		{"ghcr.io/acme/", "ghcr.io/acmeb/agent", false},
		{"ghcr.io/acme", "ghcr.io/other/agent", false},
		{"ghcr.io/*", "ghcr.io/acme/agent", false},
		{"ghcr.io/acme/agent", "ghcr.io/acme/agent@sha256:abc", true},
		// Globs use path.Match syntax within a part, but the pattern is
		// parsed as a URL first, as kubelet does: "?" starts a query.
		{"reg*x.io", "reg1x.io/x", true},
		{"reg?.io", "reg1.io/x", false},
		// Case is compared as is (kubelet does not fold it).
		{"GHCR.io", "ghcr.io/x", false},
	} {
		got, err := MatchImage(tc.pattern, tc.image)
		if err != nil {
			t.Errorf("MatchImage(%q, %q): %v", tc.pattern, tc.image, err)
			continue
		}
		if got != tc.want {
			t.Errorf("MatchImage(%q, %q) = %v, want %v", tc.pattern, tc.image, got, tc.want)
		}
	}
	// What kubelet's URL parsing refuses is an error (kubelet then skips
	// the pattern).
	for _, bad := range []string{"reg[.io", "reg[0-9].io", "registry.io:*"} {
		if _, err := MatchImage(bad, "reg.io/x"); err == nil {
			t.Errorf("MatchImage(%q) is not an error", bad)
		}
	}
	for _, bad := range []string{"https://ghcr.io", "reg[.io", "a..b", "%zz", "reg?.io", "u@reg.io"} {
		if err := ValidMatchImage(bad); err == nil {
			t.Errorf("ValidMatchImage(%q) accepted it", bad)
		}
	}
	for _, ok := range []string{"ghcr.io", "*.azurecr.io", "registry.io:8080/path", "127.0.0.1:5000/team"} {
		if err := ValidMatchImage(ok); err != nil {
			t.Errorf("ValidMatchImage(%q): %v", ok, err)
		}
	}
}

const req1 = `{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderRequest","image":"127.0.0.1:5000/team/app:v1"}`

func TestDecodeProviderRequest(t *testing.T) {
	t.Parallel()
	const tok = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
	good := `{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderRequest","image":"ghcr.io/acme/app:1",` +
		`"serviceAccountToken":"` + tok + `","serviceAccountAnnotations":{"a.io/x":"1"}}`
	r, err := DecodeProviderRequest(strings.NewReader(good + "\n"))
	if err != nil {
		t.Fatal(err)
	}
	if r.Image != "ghcr.io/acme/app:1" || r.ServiceAccountToken != tok || r.ServiceAccountAnnotations["a.io/x"] != "1" {
		t.Errorf("decoded %#v", r)
	}
	if s := fmt.Sprintf("%v %+v %#v %s", r, r, r, r); strings.Contains(s, tok) {
		t.Errorf("the request prints its token: %s", s)
	}
	for _, tc := range []struct{ in, want string }{
		{``, "decode"},
		{`[]`, "want a JSON object"},
		{`{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderRequest","image":"x","extra":1}`, `unknown field "extra"`},
		{`{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderRequest","Image":"x"}`, `field names are case-sensitive`},
		{`{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderRequest","image":"x","image":"y"}`, `duplicate field "image"`},
		{`{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderRequest","image":"x","serviceAccountAnnotations":{"a":"1","a":"2"}}`, `duplicate key "a"`},
		{`{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderRequest","image":"x","serviceAccountAnnotations":{"a":1}}`, `wrong type`},
		{`{"apiVersion":"credentialprovider.kubelet.k8s.io/v1beta1","kind":"CredentialProviderRequest","image":"x"}`, `apiVersion "credentialprovider.kubelet.k8s.io/v1beta1"`},
		{`{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","image":"x"}`, `kind "CredentialProviderResponse"`},
		{`{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderRequest","image":""}`, `image is empty`},
		{`{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderRequest","image":"x"} {}`, `unexpected data after`},
		{`{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderRequest","image":"x","serviceAccountToken":"` + tok + `"`, `decode`},
		{`{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderRequest","image":"x","serviceAccountToken":42}`, `wrong type`},
	} {
		_, err := DecodeProviderRequest(strings.NewReader(tc.in))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("DecodeProviderRequest(%s) = %v, want an error containing %q", tc.in, err, tc.want)
			continue
		}
		if strings.Contains(err.Error(), tok) {
			t.Errorf("the error quotes the token: %v", err)
		}
	}
	if _, err := DecodeProviderRequest(strings.NewReader(`{"image":"` + strings.Repeat("a", maxRequest) + `"}`)); err == nil {
		t.Error("an oversized request was accepted")
	}
}

func mkSecret(t *testing.T, s *secret.Store, project, name string, v secret.Value, regs ...string) {
	t.Helper()
	var ps []secret.Pattern
	for _, r := range regs {
		p, err := secret.ParsePattern(r)
		if err != nil {
			t.Fatal(err)
		}
		ps = append(ps, p)
	}
	kind := secret.Basic
	if v.IdentityToken != "" {
		kind = secret.Token
	}
	if _, err := s.Create(context.Background(), secret.Secret{Project: project, Name: name, Kind: kind, Registries: ps}, v); err != nil {
		t.Fatal(err)
	}
}

func TestProviderLocal(t *testing.T) {
	t.Parallel()
	store := newStore(t)
	mkSecret(t, store, "acme", "local", secret.Value{Username: "bot", Password: canary}, "127.0.0.1:5000/team")
	mkSecret(t, store, "acme", "hub", secret.Value{Username: "hubuser", Password: "hubpw"}, "docker.io")
	mkSecret(t, store, "acme", "tok", secret.Value{IdentityToken: "idtoken"}, "ghcr.io")
	mkSecret(t, store, "other", "other", secret.Value{Username: "x", Password: "other-pw"}, "quay.io")
	p := &Provider{Source: &LocalProviderSource{Store: store, Project: "acme"}}
	for _, tc := range []struct {
		image, key, keyType, user, pass string
	}{
		{"127.0.0.1:5000/team/app:v1", "127.0.0.1:5000/team", "Image", "bot", canary},
		{"127.0.0.1:5000/team/sub/app@sha256:" + strings.Repeat("a", 64), "127.0.0.1:5000/team", "Image", "bot", canary},
		{"alpine", "docker.io", "Registry", "hubuser", "hubpw"},
		{"docker.io/library/alpine:3", "docker.io", "Registry", "hubuser", "hubpw"},
		{"index.docker.io/acme/app", "docker.io", "Registry", "hubuser", "hubpw"},
		{"ghcr.io/acme/agent:1.4", "ghcr.io", "Registry", credhelper.TokenUsername, "idtoken"},
		{"127.0.0.1:5000/other/app:v1", "", "", "", ""},
		{"quay.io/acme/app", "", "", "", ""}, // another project's registry
	} {
		in := `{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderRequest","image":"` + tc.image + `"}`
		var out bytes.Buffer
		if err := p.Serve(context.Background(), strings.NewReader(in), &out); err != nil {
			t.Errorf("%s: %v", tc.image, err)
			continue
		}
		resp := kubeletDecode(t, out.Bytes())
		if tc.key == "" {
			if len(resp.Auth) != 0 || resp.CacheDuration == nil || resp.CacheDuration.Duration != 0 {
				t.Errorf("%s: want an empty, uncached auth, got %s", tc.image, out.String())
			}
			if strings.Contains(out.String(), "other-pw") {
				t.Errorf("%s: another project's secret answered", tc.image)
			}
			continue
		}
		a, ok := resp.Auth[tc.key]
		if !ok || len(resp.Auth) != 1 || a.Username != tc.user || a.Password != tc.pass {
			t.Errorf("%s: auth %v, want %s: %s/%s", tc.image, resp.Auth, tc.key, tc.user, tc.pass)
		}
		if string(resp.CacheKeyType) != tc.keyType {
			t.Errorf("%s: cacheKeyType %s, want %s", tc.image, resp.CacheKeyType, tc.keyType)
		}
		if resp.CacheDuration == nil || resp.CacheDuration.Duration != DefaultProviderCacheDuration {
			t.Errorf("%s: cacheDuration %v", tc.image, resp.CacheDuration)
		}
		// Kubelet will use the auth only if its key matches the image (its
		// image is normalised: docker.io/library/alpine).
		norm := tc.image
		if !strings.Contains(strings.Split(norm, "/")[0], ".") && !strings.Contains(strings.Split(norm, "/")[0], ":") {
			norm = "docker.io/library/" + norm
		}
		norm = strings.Replace(norm, "index.docker.io", "docker.io", 1)
		if ok, err := MatchImage(tc.key, norm); !ok || err != nil {
			t.Errorf("%s: kubelet would not match key %s against it (%v)", tc.image, tc.key, err)
		}
	}
}

type fakeSource struct {
	c   *ProviderCredential
	err error
}

func (f fakeSource) ProviderCredential(context.Context, *ProviderRequest) (*ProviderCredential, error) {
	return f.c, f.err
}

func TestProviderCacheDuration(t *testing.T) {
	t.Parallel()
	now := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		expires time.Time
		def     time.Duration
		want    string
		wantErr bool
	}{
		{time.Time{}, 0, "5m0s", false},
		{time.Time{}, time.Hour, "1h0m0s", false},
		{now.Add(12 * time.Hour), 0, "5m0s", false},
		{now.Add(12 * time.Hour), 24 * time.Hour, "6h0m0s", false},
		{now.Add(4 * time.Minute), 0, "2m0s", false},
		{now.Add(3*time.Minute + 1*time.Second), 0, "1m30s", false},
		{now.Add(1500 * time.Millisecond), 0, "0s", false},
		{now, 0, "", true},
		{now.Add(-time.Minute), 0, "", true},
	} {
		c := &ProviderCredential{Key: "reg.io", Credential: secret.Credential{Username: "u", Password: "p", Expires: tc.expires}, CacheKeyType: CacheKeyRegistry}
		p := &Provider{Source: fakeSource{c: c}, DefaultCacheDuration: tc.def, Now: func() time.Time { return now }}
		var out bytes.Buffer
		err := p.Serve(context.Background(), strings.NewReader(`{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderRequest","image":"reg.io/x"}`), &out)
		if tc.wantErr {
			if err == nil {
				t.Errorf("expires %v: want an error", tc.expires)
			}
			continue
		}
		if err != nil {
			t.Errorf("expires %v: %v", tc.expires, err)
			continue
		}
		resp := kubeletDecode(t, out.Bytes())
		if resp.CacheDuration == nil || resp.CacheDuration.Duration.String() != tc.want {
			t.Errorf("expires %v default %v: cacheDuration %v, want %s", tc.expires, tc.def, resp.CacheDuration, tc.want)
		}
		if !tc.expires.IsZero() && resp.CacheDuration.Duration > tc.expires.Sub(now)/2 {
			t.Errorf("cacheDuration %v is more than half of the remaining life %v", resp.CacheDuration.Duration, tc.expires.Sub(now))
		}
	}
}

func TestProviderErrors(t *testing.T) {
	t.Parallel()
	boom := errors.New("server down")
	p := &Provider{Source: fakeSource{err: boom}}
	var out bytes.Buffer
	if err := p.Serve(context.Background(), strings.NewReader(req1), &out); !errors.Is(err, boom) || out.Len() != 0 {
		t.Errorf("a source error: %v, output %q", err, out.String())
	}
	p = &Provider{Source: fakeSource{err: ErrNoCredential}}
	out.Reset()
	if err := p.Serve(context.Background(), strings.NewReader(req1), &out); err != nil {
		t.Fatal(err)
	}
	resp := kubeletDecode(t, out.Bytes())
	if len(resp.Auth) != 0 || resp.CacheKeyType != cpv1.ImagePluginCacheKeyType {
		t.Errorf("no credential: %s", out.String())
	}
}

// FuzzDecodeProviderRequest: no input panics the strict decoder, and what
// it accepts has the right apiVersion, kind and an image.
func FuzzDecodeProviderRequest(f *testing.F) {
	f.Add([]byte(req1))
	f.Add([]byte(`{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderRequest","image":"x","serviceAccountAnnotations":{"a":"b"}}`))
	f.Add([]byte(`{"image":1}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := DecodeProviderRequest(bytes.NewReader(data))
		if err == nil && (r.APIVersion != ProviderAPIVersion || r.Kind != RequestKind || strings.TrimSpace(r.Image) == "") {
			t.Fatalf("accepted %q", data)
		}
	})
}

// FuzzMatchImage: kubelet's glob rules never panic, and a pattern always
// matches itself when it is a plain host.
func FuzzMatchImage(f *testing.F) {
	for _, s := range [][2]string{{"*.docker.io", "a.docker.io/x"}, {"reg.io:5000/p", "reg.io:5000/p/q"}, {"[::1]:5000", "[::1]:5000/x"}} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, pattern, image string) {
		MatchImage(pattern, image)
		if ValidMatchImage(pattern) == nil && !strings.ContainsAny(pattern, "*?[]\\/") {
			if ok, err := MatchImage(pattern, pattern); err == nil && !ok {
				t.Fatalf("%q does not match itself", pattern)
			}
		}
	})
}

func newStore(t *testing.T) *secret.Store {
	t.Helper()
	s, err := secret.Open(filepath.Join(t.TempDir(), "home"))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

const canary = "canary-pw-51c0de"
