package proxy

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/pullsecret/pullsecret/registry"
)

// fakeUpstream is an httptest registry whose handler the test writes. It
// asks for Basic pxUser/pxCanary unless open.
func fakeUpstream(t *testing.T, open bool, h http.HandlerFunc) *httptest.Server {
	t.Helper()
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !open {
			u, p, ok := r.BasicAuth()
			if !ok || u != pxUser || p != pxCanary {
				w.Header().Set("WWW-Authenticate", `Basic realm="fake"`)
				w.WriteHeader(401)
				return
			}
		}
		if r.URL.Path == "/v2/" {
			w.WriteHeader(200)
			return
		}
		h(w, r)
	}))
	t.Cleanup(s.Close)
	return s
}

func hostOf(s *httptest.Server) string { return strings.TrimPrefix(s.URL, "http://") }

func digestOf(b []byte) string {
	h := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(h[:])
}

// TestPrivateAddressesRefused: upstreams on metadata, private and
// loopback addresses are refused unless allowed; an unlisted host never
// reaches the network.
func TestPrivateAddressesRefused(t *testing.T) {
	t.Parallel()
	up := pxUpstream(t, false)
	_, port, _ := strings.Cut(up.Host(), ":")
	// Only 172.16.0.0/12 is allowed here: loopback and 10/8 are not.
	f := newPX(t, func(c *Config) {
		c.AllowPrivateUpstreams.Set([]string{"172.16.0.0/12"})
		c.Upstream.DialTimeout = 2 * time.Second
	})
	f.addSecret("acme", "meta", "169.254.169.254", pxUser, pxCanary)
	f.addSecret("acme", "meta6", "[fd00:ec2::254]", pxUser, pxCanary)
	f.addSecret("acme", "loop", "localhost:"+port, pxUser, pxCanary)
	f.addSecret("acme", "ten", "10.0.0.1", pxUser, pxCanary)
	tok := f.token("acme", ScopePull)
	for _, tc := range []struct {
		path, want string
	}{
		{"/v2/169.254.169.254/latest/manifests/v1", "cloud metadata"},
		{"/v2/[fd00:ec2::254]/x/manifests/v1", "cloud metadata"},
		{"/v2/localhost:" + port + "/app/manifests/v1", "loopback"},
		{"/v2/10.0.0.1/app/manifests/v1", "private"},
		{"/v2/unlisted.example.com/app/manifests/v1", "not an upstream of project acme"},
		{"/v2/app/manifests/v1?ns=10.0.0.2", "not an upstream of project acme"},
	} {
		resp := f.get(tc.path, tok)
		body := f.readAll(resp)
		code, msg := errorCode(body)
		if resp.StatusCode != http.StatusForbidden || code != CodeDenied || !strings.Contains(msg, tc.want) {
			t.Errorf("%s: %d %s, want DENIED mentioning %q", tc.path, resp.StatusCode, body, tc.want)
		}
	}
	if n := len(up.Requests()); n != 0 {
		t.Errorf("the loopback upstream received %d requests", n)
	}
}

// TestRedirectCarriesNoCredentials: a blob redirected to another host
// (object storage) is fetched by the proxy without the upstream
// credential, and the bytes still arrive.
func TestRedirectCarriesNoCredentials(t *testing.T) {
	t.Parallel()
	blob := []byte(strings.Repeat("layer-bytes ", 5000))
	d := digestOf(blob)
	var mu sync.Mutex
	var storageAuth []string
	storage := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		storageAuth = append(storageAuth, r.Header.Get("Authorization")+"|"+r.Header.Get("Cookie"))
		mu.Unlock()
		if r.URL.Path == "/deny" {
			w.WriteHeader(http.StatusForbidden)
			return
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(blob)))
		w.Write(blob)
	}))
	t.Cleanup(storage.Close)
	var upstreamAuthed atomic.Int32
	up := fakeUpstream(t, false, func(w http.ResponseWriter, r *http.Request) {
		upstreamAuthed.Add(1)
		if r.URL.Path == "/v2/app/blobs/"+d {
			http.Redirect(w, r, storage.URL+"/bucket/blob?X-Amz-Signature=abc", http.StatusTemporaryRedirect)
			return
		}
		if strings.HasPrefix(r.URL.Path, "/v2/app/blobs/sha256:0000") {
			http.Redirect(w, r, storage.URL+"/deny", http.StatusFound)
			return
		}
		http.NotFound(w, r)
	})
	f := newPX(t)
	f.addSecret("acme", "up", hostOf(up), pxUser, pxCanary)
	tok := f.token("acme", ScopePull)
	resp := f.get("/v2/"+hostOf(up)+"/app/blobs/"+d, tok)
	got := f.readAll(resp)
	if resp.StatusCode != 200 || got != string(blob) {
		t.Fatalf("blob through redirect: %d (%d bytes)", resp.StatusCode, len(got))
	}
	// Storage refusing the redirected request is not the upstream
	// rejecting the project's secret.
	resp = f.get("/v2/"+hostOf(up)+"/app/blobs/sha256:"+strings.Repeat("0", 64), tok)
	body := f.readAll(resp)
	if code, msg := errorCode(body); resp.StatusCode != http.StatusBadGateway || code != CodeUnavailable || !strings.Contains(msg, "redirected") {
		t.Fatalf("storage 403: %d %s", resp.StatusCode, body)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(storageAuth) == 0 {
		t.Fatal("storage was never asked")
	}
	for _, a := range storageAuth {
		if a != "|" {
			t.Fatalf("object storage received credentials: %q", a)
		}
	}
	if upstreamAuthed.Load() == 0 {
		t.Fatal("the upstream never saw an authenticated request")
	}
	if strings.Contains(f.logs.String(), "abc") && strings.Contains(f.logs.String(), "X-Amz-Signature=abc") {
		t.Error("a pre-signed URL signature was logged")
	}
}

// TestForeignTokenRealmRefused: an upstream naming a token server off its
// domain gets neither the credential nor a request.
func TestForeignTokenRealmRefused(t *testing.T) {
	t.Parallel()
	var realmHits atomic.Int32
	realm := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		realmHits.Add(1)
		w.Write([]byte(`{"token":"x"}`))
	}))
	t.Cleanup(realm.Close)
	_, rport, _ := strings.Cut(hostOf(realm), ":")
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer realm="http://localhost:%s/token",service="evil"`, rport))
		w.WriteHeader(401)
	}))
	t.Cleanup(up.Close)
	f := newPX(t)
	f.addSecret("acme", "up", hostOf(up), pxUser, pxCanary)
	tok := f.token("acme", ScopePull)
	resp := f.get("/v2/"+hostOf(up)+"/app/manifests/v1", tok)
	body := f.readAll(resp)
	code, msg := errorCode(body)
	if resp.StatusCode != http.StatusBadGateway || code != CodeDenied || !strings.Contains(msg, "outside its own domain") {
		t.Fatalf("%d %s", resp.StatusCode, body)
	}
	if n := realmHits.Load(); n != 0 {
		t.Fatalf("the foreign realm received %d requests", n)
	}
}

// TestWrongUpstreamCredentials: the upstream refusing the project's pull
// secret is DENIED with a clear message, never 404; rotating the secret
// takes effect on the next request.
func TestWrongUpstreamCredentials(t *testing.T) {
	t.Parallel()
	for _, token := range []bool{false, true} {
		t.Run(map[bool]string{false: "htpasswd", true: "token"}[token], func(t *testing.T) {
			t.Parallel()
			up := pxUpstream(t, token)
			if _, err := up.SeedRandom(t.Context(), "app", "v1"); err != nil {
				t.Fatal(err)
			}
			f := newPX(t, withAliases(map[string]string{"up": up.Host()}))
			f.addSecret("acme", "up", up.Host(), pxUser, "wrong-password")
			tok := f.token("acme", ScopePull)
			resp := f.get("/v2/up/app/manifests/v1", tok)
			body := f.readAll(resp)
			code, msg := errorCode(body)
			want := "upstream rejected the project's pull secret for " + up.Host()
			if resp.StatusCode != http.StatusForbidden || code != CodeDenied || msg != want {
				t.Fatalf("%d %s", resp.StatusCode, body)
			}
			_, err := remote.Image(f.ref("up/app:v1"), f.client(tok)...)
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Fatalf("client error %v", err)
			}
			// Rotate to the right password: resolved at request time.
			f.addSecret("acme", "up", up.Host(), pxUser, pxCanary)
			if _, err := remote.Image(f.ref("up/app:v1"), f.client(tok)...); err != nil {
				t.Fatalf("after rotation: %v", err)
			}
		})
	}
}

// TestLyingUpstream: manifests and blobs that do not match their digest
// are never served whole.
func TestLyingUpstream(t *testing.T) {
	t.Parallel()
	good := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}`)
	evil := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[],"x":1}`)
	blob := []byte(strings.Repeat("honest bytes ", 10000))
	bad := append([]byte(nil), blob...)
	bad[len(bad)-1] ^= 0xff
	up := fakeUpstream(t, true, func(w http.ResponseWriter, r *http.Request) {
		switch {
		case strings.HasSuffix(r.URL.Path, "/manifests/"+digestOf(good)):
			w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
			w.Write(evil)
		case strings.HasSuffix(r.URL.Path, "/manifests/v1"):
			w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
			w.Header().Set("Docker-Content-Digest", digestOf(good))
			w.Write(evil)
		case strings.HasSuffix(r.URL.Path, "/manifests/huge"):
			w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
			w.Write([]byte(strings.Repeat(" ", 5<<20)))
		case strings.HasSuffix(r.URL.Path, "/blobs/"+digestOf(blob)):
			w.Header().Set("Content-Length", strconv.Itoa(len(bad)))
			w.Write(bad)
		case strings.HasSuffix(r.URL.Path, "/blobs/"+digestOf([]byte("chunked"))):
			w.Write([]byte("chunkeX")) // no Content-Length: chunked
			w.(http.Flusher).Flush()
		default:
			http.NotFound(w, r)
		}
	})
	f := newPX(t)
	f.addSecret("acme", "up", hostOf(up), pxUser, pxCanary)
	tok := f.token("acme", ScopePull)
	base := "/v2/" + hostOf(up) + "/app"
	for _, ref := range []string{digestOf(good), "v1"} {
		resp := f.get(base+"/manifests/"+ref, tok)
		body := f.readAll(resp)
		if code, msg := errorCode(body); resp.StatusCode != http.StatusBadGateway || code != CodeManifestInvalid || !strings.Contains(msg, "digest does not match") {
			t.Errorf("manifest %s: %d %s", ref, resp.StatusCode, body)
		}
	}
	resp := f.get(base+"/manifests/huge", tok)
	body := f.readAll(resp)
	if code, msg := errorCode(body); code != CodeManifestInvalid || !strings.Contains(msg, "too large") {
		t.Errorf("huge manifest: %d %s", resp.StatusCode, body)
	}
	for _, d := range []string{digestOf(blob), digestOf([]byte("chunked"))} {
		resp = f.get(base+"/blobs/"+d, tok)
		got, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == 200 && err == nil {
			t.Errorf("blob %s: a corrupt body was served whole (%d bytes)", d, len(got))
		}
	}
	if !strings.Contains(f.logs.String(), "does not match its digest") {
		t.Error("the mismatch was not logged")
	}
}

// TestCorruptBlobFromRegistry uses the registry harness' Corrupt fault.
func TestCorruptBlobFromRegistry(t *testing.T) {
	t.Parallel()
	up := pxUpstream(t, false)
	d, err := up.SeedBlob(t.Context(), "app", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	up.Faults().MustAdd(http.MethodGet, "/blobs/", registry.Corrupt(1000))
	f := newPX(t, withAliases(map[string]string{"up": up.Host()}))
	f.addSecret("acme", "up", up.Host(), pxUser, pxCanary)
	resp := f.get("/v2/up/app/blobs/"+d.String(), f.token("acme", ScopePull))
	_, err = io.ReadAll(resp.Body)
	resp.Body.Close()
	if err == nil {
		t.Fatal("a corrupt blob was served whole")
	}
}

// TestClientDisconnectCancelsUpstream: the upstream request dies with the
// client's.
func TestClientDisconnectCancelsUpstream(t *testing.T) {
	t.Parallel()
	done := make(chan struct{})
	d := "sha256:" + strings.Repeat("ab", 32)
	up := fakeUpstream(t, false, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(1<<30))
		chunk := make([]byte, 64<<10)
		for i := 0; i < 16; i++ {
			w.Write(chunk)
		}
		w.(http.Flusher).Flush()
		select {
		case <-r.Context().Done():
			close(done)
		case <-time.After(30 * time.Second):
		}
	})
	f := newPX(t)
	f.addSecret("acme", "up", hostOf(up), pxUser, pxCanary)
	resp := f.get("/v2/"+hostOf(up)+"/app/blobs/"+d, f.token("acme", ScopePull))
	if _, err := io.ReadFull(resp.Body, make([]byte, 128<<10)); err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the upstream request was not canceled when the client left")
	}
}

// TestUpstreamFailures: how upstream failures reach the client.
func TestUpstreamFailures(t *testing.T) {
	t.Parallel()
	up := pxUpstream(t, false)
	if _, err := up.SeedRandom(t.Context(), "app", "v1"); err != nil {
		t.Fatal(err)
	}
	closed := httptest.NewServer(http.NotFoundHandler())
	closedHost := hostOf(closed)
	closed.Close()
	f := newPX(t, withAliases(map[string]string{"up": up.Host(), "gone": closedHost}), func(c *Config) {
		c.Upstream.RequestTimeout = 5 * time.Second
	})
	f.addSecret("acme", "up", up.Host(), pxUser, pxCanary)
	tok := f.token("acme", ScopePull)
	for _, tc := range []struct {
		name   string
		fault  *registry.Fault
		path   string
		status int
		code   string
		header string
	}{
		{"429", ptr(registry.TooManyRequests(7 * time.Second)), "/v2/up/app/manifests/v1", 429, CodeTooManyRequests, "Retry-After=7"},
		{"500", ptr(registry.Status(500)), "/v2/up/app/manifests/v1", 502, CodeUnavailable, ""},
		{"503", ptr(registry.Status(503)), "/v2/up/app/manifests/v1", 503, CodeUnavailable, ""},
		{"unknown manifest", nil, "/v2/up/app/manifests/nope", 404, CodeManifestUnknown, ""},
		{"unknown repo tags", nil, "/v2/up/nothing/tags/list", 404, CodeNameUnknown, ""},
		{"unreachable", nil, "/v2/gone/app/manifests/v1", 502, CodeUnavailable, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var rule *registry.Rule
			if tc.fault != nil {
				rule = up.Faults().MustAdd(http.MethodGet, "/manifests/", *tc.fault)
				defer up.Faults().Remove(rule)
			}
			resp := f.get(tc.path, tok)
			body := f.readAll(resp)
			if code, _ := errorCode(body); resp.StatusCode != tc.status || code != tc.code {
				t.Fatalf("%d %s, want %d %s", resp.StatusCode, body, tc.status, tc.code)
			}
			if k, v, ok := strings.Cut(tc.header, "="); ok && resp.Header.Get(k) != v {
				t.Fatalf("%s: %q", k, resp.Header.Get(k))
			}
		})
	}
}

func ptr[T any](v T) *T { return &v }
