package proxy_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/pullsecret/pullsecret/credhelper/kubelet"
	"github.com/pullsecret/pullsecret/internal/testbin"
	"github.com/pullsecret/pullsecret/proxy"
	"github.com/pullsecret/pullsecret/secret"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	cpv1 "k8s.io/kubelet/pkg/apis/credentialprovider/v1"
)

const (
	kubIssuerA  = "https://cluster-a.example"
	kubIssuerB  = "https://cluster-b.example"
	kubAudience = "pullsecret"
	kubProxy    = "pullsecret.internal:5000"
	// Both projects hold a secret for the same registry: each service
	// account must get its own.
	kubAlphaPW = "canary-alpha-pw-1c9e"
	kubBetaPW  = "canary-beta-pw-77d2"
)

// kubWorld is two clusters' keys, a store with projects alpha and beta,
// and the kubelet API bound to them.
type kubWorld struct {
	t       *testing.T
	rsaKey  *rsa.PrivateKey // cluster A, kid "a1"
	ecKey   *ecdsa.PrivateKey
	now     time.Time
	store   *secret.Store
	tokens  *proxy.TokenStore
	api     *proxy.KubeletAPI
	mu      sync.Mutex
	events  []proxy.KubeletAuditEvent
	jwksB   string // file
	pemFile string
}

func newKubWorld(t *testing.T) *kubWorld {
	t.Helper()
	w := &kubWorld{t: t, now: time.Now()}
	var err error
	if w.rsaKey, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
		t.Fatal(err)
	}
	if w.ecKey, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	w.store, err = secret.Open(filepath.Join(dir, "home"))
	if err != nil {
		t.Fatal(err)
	}
	mk := func(project, name, user, pw string, regs ...string) {
		var ps []secret.Pattern
		for _, r := range regs {
			p, _ := secret.ParsePattern(r)
			ps = append(ps, p)
		}
		if _, err := w.store.Create(context.Background(), secret.Secret{Project: project, Name: name, Kind: secret.Basic, Registries: ps}, secret.Value{Username: user, Password: pw}); err != nil {
			t.Fatal(err)
		}
	}
	mk("alpha", "ghcr", "alpha-bot", kubAlphaPW, "ghcr.io/acme")
	mk("alpha", "hub", "alpha-hub", kubAlphaPW, "docker.io")
	mk("beta", "ghcr", "beta-bot", kubBetaPW, "ghcr.io/acme")
	if w.tokens, err = proxy.NewTokenStore(filepath.Join(dir, "home")); err != nil {
		t.Fatal(err)
	}
	jwksA, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: &w.rsaKey.PublicKey, KeyID: "a1", Algorithm: "RS256", Use: "sig"}}})
	w.jwksB = filepath.Join(dir, "b.jwks.json")
	jwksB, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: &w.ecKey.PublicKey, KeyID: "b1", Algorithm: "ES256", Use: "sig"}}})
	if err := os.WriteFile(w.jwksB, jwksB, 0o644); err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalPKIXPublicKey(&w.rsaKey.PublicKey)
	w.pemFile = filepath.Join(dir, "sa.pub")
	if err := os.WriteFile(w.pemFile, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := proxy.KubeletConfig{
		Issuers: []proxy.KubeletIssuer{
			{Issuer: kubIssuerA, Audience: kubAudience, JWKS: string(jwksA)},
			{Issuer: kubIssuerB, Audience: kubAudience, JWKSFile: w.jwksB},
		},
		Bindings: []proxy.KubeletBinding{
			{Issuer: kubIssuerA, Namespace: "team-a", ServiceAccount: "builder", Project: "alpha"},
			{Issuer: kubIssuerA, Namespace: "team-b", ServiceAccount: "*", Project: "beta"},
			{Issuer: kubIssuerA, Namespace: "team-b", ServiceAccount: "special", Project: "alpha"},
			{Issuer: kubIssuerB, Namespace: "team-a", ServiceAccount: "builder", Project: "beta"},
		},
		ProxyHosts: []string{kubProxy},
	}
	w.api, err = proxy.NewKubeletAPI(cfg, w.store, proxy.WithKubeletPullTokens(w.tokens),
		proxy.WithKubeletClock(func() time.Time { return w.now }),
		proxy.WithKubeletAudit(func(e proxy.KubeletAuditEvent) { w.mu.Lock(); w.events = append(w.events, e); w.mu.Unlock() }))
	if err != nil {
		t.Fatal(err)
	}
	return w
}

type kubClaims struct {
	jwt.Claims
	K8s map[string]any `json:"kubernetes.io,omitempty"`
}

// token signs a service account token; mutate adjusts its claims.
func (w *kubWorld) token(issuer, ns, sa string, mutate func(*kubClaims)) string {
	w.t.Helper()
	c := kubClaims{
		Claims: jwt.Claims{
			Issuer:    issuer,
			Subject:   "system:serviceaccount:" + ns + ":" + sa,
			Audience:  jwt.Audience{kubAudience},
			Expiry:    jwt.NewNumericDate(w.now.Add(10 * time.Minute)),
			NotBefore: jwt.NewNumericDate(w.now.Add(-time.Minute)),
			IssuedAt:  jwt.NewNumericDate(w.now.Add(-time.Minute)),
		},
		K8s: map[string]any{
			"namespace":      ns,
			"serviceaccount": map[string]string{"name": sa, "uid": "uid-" + sa},
			"pod":            map[string]string{"name": "pod-1", "uid": "pod-uid"},
		},
	}
	var key jose.SigningKey
	switch issuer {
	case kubIssuerB:
		key = jose.SigningKey{Algorithm: jose.ES256, Key: jose.JSONWebKey{Key: w.ecKey, KeyID: "b1"}}
	default:
		key = jose.SigningKey{Algorithm: jose.RS256, Key: jose.JSONWebKey{Key: w.rsaKey, KeyID: "a1"}}
	}
	if mutate != nil {
		mutate(&c)
	}
	return w.sign(key, c)
}

func (w *kubWorld) sign(key jose.SigningKey, c any) string {
	w.t.Helper()
	signer, err := jose.NewSigner(key, (&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		w.t.Fatal(err)
	}
	s, err := jwt.Signed(signer).Claims(c).Serialize()
	if err != nil {
		w.t.Fatal(err)
	}
	return s
}

type kubAnswer struct {
	status int
	body   string
	resp   struct {
		Registry, CacheKeyType, Username, Password string `json:",omitempty"`
		ExpiresAt                                  *time.Time
	}
}

func (w *kubWorld) post(body string) kubAnswer {
	w.t.Helper()
	req := httptest.NewRequest(http.MethodPost, proxy.KubeletAPIPath, strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	rr := httptest.NewRecorder()
	w.api.ServeHTTP(rr, req)
	a := kubAnswer{status: rr.Code, body: rr.Body.String()}
	if rr.Code == http.StatusOK {
		var r struct {
			Registry     string     `json:"registry"`
			CacheKeyType string     `json:"cache_key_type"`
			Username     string     `json:"username"`
			Password     string     `json:"password"`
			ExpiresAt    *time.Time `json:"expires_at"`
		}
		if err := json.Unmarshal(rr.Body.Bytes(), &r); err != nil {
			w.t.Fatalf("response %s: %v", a.body, err)
		}
		a.resp.Registry, a.resp.CacheKeyType, a.resp.Username, a.resp.Password, a.resp.ExpiresAt = r.Registry, r.CacheKeyType, r.Username, r.Password, r.ExpiresAt
	}
	return a
}

func (w *kubWorld) ask(image, token string) kubAnswer {
	w.t.Helper()
	b, _ := json.Marshal(map[string]any{"image": image, "service_account_token": token, "service_account_annotations": map[string]string{"pullsecret.dev/project": "beta"}})
	return w.post(string(b))
}

func TestKubeletAPIBindings(t *testing.T) {
	t.Parallel()
	w := newKubWorld(t)
	const img = "ghcr.io/acme/agent:1.4"
	for _, tc := range []struct {
		name           string
		image          string
		token          string
		status         int
		user, pw, key  string
		keyType, inErr string
	}{
		{"alpha's builder gets alpha's secret", img, w.token(kubIssuerA, "team-a", "builder", nil), 200, "alpha-bot", kubAlphaPW, "ghcr.io/acme", "Image", ""},
		{"any account of team-b gets beta's", img, w.token(kubIssuerA, "team-b", "deployer", nil), 200, "beta-bot", kubBetaPW, "ghcr.io/acme", "Image", ""},
		{"an exact binding beats the namespace's", img, w.token(kubIssuerA, "team-b", "special", nil), 200, "alpha-bot", kubAlphaPW, "ghcr.io/acme", "Image", ""},
		{"the same name in another cluster is another account", img, w.token(kubIssuerB, "team-a", "builder", nil), 200, "beta-bot", kubBetaPW, "ghcr.io/acme", "Image", ""},
		{"whole-registry secret", "nginx:1", w.token(kubIssuerA, "team-a", "builder", nil), 200, "alpha-hub", kubAlphaPW, "docker.io", "Registry", ""},
		{"unbound account", img, w.token(kubIssuerA, "team-a", "intruder", nil), 403, "", "", "", "", "service account team-a/intruder is bound to no project"},
		{"unbound namespace", img, w.token(kubIssuerA, "kube-system", "default", nil), 403, "", "", "", "", "bound to no project"},
		{"no secret covers the image", "quay.io/acme/agent:1", w.token(kubIssuerA, "team-a", "builder", nil), 404, "", "", "", "", "no pull secret"},
		{"beta has no docker.io secret", "nginx:1", w.token(kubIssuerA, "team-b", "x", nil), 404, "", "", "", "", "no pull secret"},
		{"invalid image", "Not An Image", w.token(kubIssuerA, "team-a", "builder", nil), 400, "", "", "", "", "invalid image"},
		{"no token", img, "", 401, "", "", "", "", "token is required"},
		{"not a JWT", img, "hello", 401, "", "", "", "", "not a signed JWT"},
		{"wrong audience", img, w.token(kubIssuerA, "team-a", "builder", func(c *kubClaims) { c.Audience = jwt.Audience{"https://kubernetes.default.svc"} }), 401, "", "", "", "", "audience is not pullsecret"},
		{"expired", img, w.token(kubIssuerA, "team-a", "builder", func(c *kubClaims) { c.Expiry = jwt.NewNumericDate(w.now.Add(-2 * time.Minute)) }), 401, "", "", "", "", "expired"},
		{"not yet valid", img, w.token(kubIssuerA, "team-a", "builder", func(c *kubClaims) { c.NotBefore = jwt.NewNumericDate(w.now.Add(5 * time.Minute)) }), 401, "", "", "", "", "not valid yet"},
		{"no expiry", img, w.token(kubIssuerA, "team-a", "builder", func(c *kubClaims) { c.Expiry = nil }), 401, "", "", "", "", "no expiry"},
		{"unknown issuer", img, w.token(kubIssuerA, "team-a", "builder", func(c *kubClaims) { c.Issuer = "https://evil.example" }), 401, "", "", "", "", "unknown issuer"},
		{"issuer A's claims, issuer B's key", img, w.token(kubIssuerB, "team-a", "builder", func(c *kubClaims) { c.Issuer = kubIssuerA }), 401, "", "", "", "", "signature does not verify"},
		{"sub and kubernetes.io disagree", img, w.token(kubIssuerA, "team-a", "builder", func(c *kubClaims) { c.Subject = "system:serviceaccount:team-b:x" }), 401, "", "", "", "", "different service accounts"},
		{"sub only", img, w.token(kubIssuerA, "team-a", "builder", func(c *kubClaims) { c.K8s = nil }), 200, "alpha-bot", kubAlphaPW, "ghcr.io/acme", "Image", ""},
		{"not a service account", img, w.token(kubIssuerA, "team-a", "builder", func(c *kubClaims) { c.K8s = nil; c.Subject = "alice" }), 401, "", "", "", "", "not a service account token"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := w.ask(tc.image, tc.token)
			if a.status != tc.status {
				t.Fatalf("status %d, want %d: %s", a.status, tc.status, a.body)
			}
			if tc.status == 200 {
				if a.resp.Username != tc.user || a.resp.Password != tc.pw || a.resp.Registry != tc.key || a.resp.CacheKeyType != tc.keyType {
					t.Errorf("answer %+v", a.resp)
				}
				return
			}
			if !strings.Contains(a.body, tc.inErr) {
				t.Errorf("body %s lacks %q", a.body, tc.inErr)
			}
			for _, pw := range []string{kubAlphaPW, kubBetaPW} {
				if strings.Contains(a.body, pw) {
					t.Errorf("an error body holds a secret: %s", a.body)
				}
			}
		})
	}
	// The audit never holds a token or a credential.
	w.mu.Lock()
	defer w.mu.Unlock()
	b, _ := json.Marshal(w.events)
	for _, s := range []string{kubAlphaPW, kubBetaPW, "eyJ"} {
		if strings.Contains(string(b), s) {
			t.Errorf("audit holds %q", s)
		}
	}
	if len(w.events) == 0 || w.events[0].Outcome != "credential" || w.events[0].Project != "alpha" || w.events[0].Namespace != "team-a" || w.events[0].Pod != "pod-1" {
		t.Errorf("first audit event: %+v", w.events[0])
	}
}

func TestKubeletAPIForgedTokens(t *testing.T) {
	t.Parallel()
	w := newKubWorld(t)
	const img = "ghcr.io/acme/agent:1.4"
	c := kubClaims{Claims: jwt.Claims{Issuer: kubIssuerA, Subject: "system:serviceaccount:team-a:builder", Audience: jwt.Audience{kubAudience},
		Expiry: jwt.NewNumericDate(w.now.Add(time.Minute))}}
	// Another key with the trusted key's id.
	other, _ := rsa.GenerateKey(rand.Reader, 2048)
	forged := w.sign(jose.SigningKey{Algorithm: jose.RS256, Key: jose.JSONWebKey{Key: other, KeyID: "a1"}}, c)
	// HS256 keyed with the public key's bytes (the algorithm confusion).
	der, _ := x509.MarshalPKIXPublicKey(&w.rsaKey.PublicKey)
	hs := w.sign(jose.SigningKey{Algorithm: jose.HS256, Key: der}, c)
	// An embedded JWK (the key inside the token) must not be trusted.
	signer, _ := jose.NewSigner(jose.SigningKey{Algorithm: jose.RS256, Key: other}, (&jose.SignerOptions{EmbedJWK: true}).WithType("JWT"))
	embedded, _ := jwt.Signed(signer).Claims(c).Serialize()
	// alg none.
	none := "eyJhbGciOiJub25lIn0." + strings.Split(forged, ".")[1] + "."
	for name, tok := range map[string]string{"foreign key": forged, "HS256": hs, "embedded JWK": embedded, "none": none} {
		if a := w.ask(img, tok); a.status != 401 {
			t.Errorf("%s: status %d: %s", name, a.status, a.body)
		}
	}
}

func TestKubeletAPIProxyToken(t *testing.T) {
	t.Parallel()
	w := newKubWorld(t)
	a := w.ask(kubProxy+"/ghcr.io/acme/agent:1.4", w.token(kubIssuerA, "team-a", "builder", nil))
	if a.status != 200 || a.resp.Registry != kubProxy || a.resp.ExpiresAt == nil {
		t.Fatalf("answer %d %s", a.status, a.body)
	}
	if a.resp.Password == kubAlphaPW {
		t.Fatal("the upstream secret was sent for the proxy host")
	}
	info, err := w.tokens.Verify(context.Background(), a.resp.Password)
	if err != nil {
		t.Fatalf("the pull token does not verify: %v", err)
	}
	if info.Project != "alpha" || len(info.Scopes) != 1 || info.Scopes[0] != proxy.ScopePull || !info.Ephemeral {
		t.Errorf("pull token: %+v", info)
	}
	if d := time.Until(info.Expires); d > proxy.DefaultKubeletPullTokenTTL+time.Minute || d <= 0 {
		t.Errorf("pull token lives %v", d)
	}
	if len(info.Repositories) != 1 || !proxy.MatchRepositoryPattern(info.Repositories[0], "ghcr.io/acme/agent") || proxy.MatchRepositoryPattern(info.Repositories[0], "ghcr.io/acme/other") {
		t.Errorf("pull token repositories: %v", info.Repositories)
	}
	// An unbound account gets no pull token either.
	if a := w.ask(kubProxy+"/ghcr.io/acme/agent:1.4", w.token(kubIssuerA, "team-a", "intruder", nil)); a.status != 403 {
		t.Errorf("unbound account on the proxy: %d %s", a.status, a.body)
	}
}

func TestKubeletAPIRequests(t *testing.T) {
	t.Parallel()
	w := newKubWorld(t)
	for _, tc := range []struct {
		method, ctype, body string
		status              int
	}{
		{http.MethodGet, "", "", 405},
		{http.MethodPost, "text/plain", `{}`, 415},
		{http.MethodPost, "application/json", `{"image":"x","service_account_token":"y","extra":1}`, 400},
		{http.MethodPost, "application/json", `not json`, 400},
		{http.MethodPost, "application/json", `{"image":"` + strings.Repeat("a", 70<<10) + `"}`, 413},
	} {
		req := httptest.NewRequest(tc.method, proxy.KubeletAPIPath, strings.NewReader(tc.body))
		if tc.ctype != "" {
			req.Header.Set("Content-Type", tc.ctype)
		}
		rr := httptest.NewRecorder()
		w.api.ServeHTTP(rr, req)
		if rr.Code != tc.status || !json.Valid(rr.Body.Bytes()) {
			t.Errorf("%s %s %.40q: %d %s, want %d", tc.method, tc.ctype, tc.body, rr.Code, rr.Body, tc.status)
		}
	}
}

func TestKubeletConfigErrors(t *testing.T) {
	t.Parallel()
	w := newKubWorld(t)
	good, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: &w.rsaKey.PublicKey, KeyID: "a1", Use: "sig"}}})
	priv, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: w.rsaKey, KeyID: "p"}}})
	small, _ := rsa.GenerateKey(rand.Reader, 1024)
	smallJ, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: &small.PublicKey, KeyID: "s"}}})
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	p384J, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: &p384.PublicKey, KeyID: "e"}}})
	iss := func(mod func(*proxy.KubeletIssuer)) proxy.KubeletConfig {
		is := proxy.KubeletIssuer{Issuer: kubIssuerA, Audience: kubAudience, JWKS: string(good)}
		mod(&is)
		return proxy.KubeletConfig{Issuers: []proxy.KubeletIssuer{is}}
	}
	for _, tc := range []struct {
		name string
		cfg  proxy.KubeletConfig
		want string
	}{
		{"no issuer", proxy.KubeletConfig{}, "at least one issuer"},
		{"no audience", iss(func(i *proxy.KubeletIssuer) { i.Audience = "" }), "audience is required"},
		{"no keys", iss(func(i *proxy.KubeletIssuer) { i.JWKS = "" }), "no verification key"},
		{"bad JWKS", iss(func(i *proxy.KubeletIssuer) { i.JWKS = "{" }), "not a JWKS document"},
		{"private key", iss(func(i *proxy.KubeletIssuer) { i.JWKS = string(priv) }), "want a public RSA or P-256 ECDSA key"},
		{"small RSA key", iss(func(i *proxy.KubeletIssuer) { i.JWKS = string(smallJ) }), "shorter than 2048 bits"},
		{"P-384", iss(func(i *proxy.KubeletIssuer) { i.JWKS = string(p384J) }), "only P-256"},
		{"missing file", iss(func(i *proxy.KubeletIssuer) { i.JWKSFile = "/nonexistent/jwks.json" }), "no such file"},
		{"binding to an unknown issuer", proxy.KubeletConfig{Issuers: iss(func(*proxy.KubeletIssuer) {}).Issuers,
			Bindings: []proxy.KubeletBinding{{Issuer: "https://other", Namespace: "a", ServiceAccount: "b", Project: "alpha"}}}, "is not configured"},
		{"binding without a project", proxy.KubeletConfig{Issuers: iss(func(*proxy.KubeletIssuer) {}).Issuers,
			Bindings: []proxy.KubeletBinding{{Namespace: "a", ServiceAccount: "b"}}}, "project"},
		{"binding twice", proxy.KubeletConfig{Issuers: iss(func(*proxy.KubeletIssuer) {}).Issuers,
			Bindings: []proxy.KubeletBinding{{Namespace: "a", ServiceAccount: "b", Project: "alpha"}, {Namespace: "a", ServiceAccount: "b", Project: "beta"}}}, "bound twice"},
		{"bad proxy host", proxy.KubeletConfig{Issuers: iss(func(*proxy.KubeletIssuer) {}).Issuers, ProxyHosts: []string{"http://x/y"}}, "proxy_hosts"},
	} {
		_, err := proxy.NewKubeletAPI(tc.cfg, w.store)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error containing %q", tc.name, err, tc.want)
		}
	}
	// PEM public keys (the API server's --service-account-key-file) work.
	api, err := proxy.NewKubeletAPI(proxy.KubeletConfig{
		Issuers:  []proxy.KubeletIssuer{{Issuer: kubIssuerA, Audience: kubAudience, PublicKeysFile: w.pemFile}},
		Bindings: []proxy.KubeletBinding{{Namespace: "team-a", ServiceAccount: "builder", Project: "alpha"}},
	}, w.store)
	if err != nil {
		t.Fatal(err)
	}
	w.api = api
	// A token without a kid is checked against every key.
	tok := w.token(kubIssuerA, "team-a", "builder", nil)
	if a := w.ask("ghcr.io/acme/x:1", tok); a.status != 200 || a.resp.Username != "alpha-bot" {
		t.Errorf("PEM key: %d %s", a.status, a.body)
	}
}

// kubDecode decodes a plugin response with kubelet's own types and strict
// codec.
func kubDecode(t *testing.T, data []byte) *cpv1.CredentialProviderResponse {
	t.Helper()
	scheme := runtime.NewScheme()
	if err := cpv1.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	obj, _, err := serializer.NewCodecFactory(scheme, serializer.EnableStrict).UniversalDeserializer().Decode(data, nil, nil)
	if err != nil {
		t.Fatalf("kubelet cannot decode %s: %v", data, err)
	}
	return obj.(*cpv1.CredentialProviderResponse)
}

// kubRequest is a request as kubelet encodes it, with its own types.
func kubRequest(t *testing.T, image, token string) []byte {
	t.Helper()
	r := cpv1.CredentialProviderRequest{
		TypeMeta: metav1.TypeMeta{APIVersion: kubelet.ProviderAPIVersion, Kind: kubelet.RequestKind},
		Image:    image,
	}
	if token != "" {
		r.ServiceAccountToken = token
		r.ServiceAccountAnnotations = map[string]string{"pullsecret.dev/team": "a"}
	}
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestKubeletProviderRoundTrip runs the plugin's protocol end to end: a
// kubelet request, the plugin's server mode, the kubelet API, and the
// response decoded by kubelet's strict codec. Two service accounts bound to
// two projects each get only their own project's credential; an unbound
// one gets an empty auth.
func TestKubeletProviderRoundTrip(t *testing.T) {
	t.Parallel()
	w := newKubWorld(t)
	mux := http.NewServeMux()
	mux.Handle(proxy.KubeletAPIPath, w.api)
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	src, err := kubelet.NewRemoteProviderSource(srv.URL, "", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	prov := &kubelet.Provider{Source: src}
	const img = "ghcr.io/acme/agent:1.4"
	for _, tc := range []struct {
		name, image, token, user, pw, key string
		cacheKey                          cpv1.PluginCacheKeyType
	}{
		{"alpha", img, w.token(kubIssuerA, "team-a", "builder", nil), "alpha-bot", kubAlphaPW, "ghcr.io/acme", cpv1.ImagePluginCacheKeyType},
		{"beta", img, w.token(kubIssuerA, "team-b", "web", nil), "beta-bot", kubBetaPW, "ghcr.io/acme", cpv1.ImagePluginCacheKeyType},
		{"alpha hub", "docker.io/library/nginx", w.token(kubIssuerA, "team-a", "builder", nil), "alpha-hub", kubAlphaPW, "docker.io", cpv1.RegistryPluginCacheKeyType},
		{"unbound", img, w.token(kubIssuerA, "team-c", "web", nil), "", "", "", cpv1.ImagePluginCacheKeyType},
		{"no match", "quay.io/x/y", w.token(kubIssuerA, "team-a", "builder", nil), "", "", "", cpv1.ImagePluginCacheKeyType},
		{"no service account", img, "", "", "", "", cpv1.ImagePluginCacheKeyType},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out bytes.Buffer
			if err := prov.Serve(context.Background(), bytes.NewReader(kubRequest(t, tc.image, tc.token)), &out); err != nil {
				t.Fatal(err)
			}
			resp := kubDecode(t, out.Bytes())
			if resp.CacheKeyType != tc.cacheKey {
				t.Errorf("cacheKeyType %s", resp.CacheKeyType)
			}
			if tc.user == "" {
				if len(resp.Auth) != 0 {
					t.Errorf("want an empty auth, got %s", out.String())
				}
				if strings.Contains(out.String(), kubAlphaPW) || strings.Contains(out.String(), kubBetaPW) {
					t.Errorf("a secret in an empty answer: %s", out.String())
				}
				return
			}
			a, ok := resp.Auth[tc.key]
			if !ok || len(resp.Auth) != 1 || a.Username != tc.user || a.Password != tc.pw {
				t.Errorf("auth %s", out.String())
			}
			if resp.CacheDuration == nil || resp.CacheDuration.Duration != kubelet.DefaultProviderCacheDuration {
				t.Errorf("cacheDuration %v", resp.CacheDuration)
			}
			other := kubBetaPW
			if tc.pw == kubBetaPW {
				other = kubAlphaPW
			}
			if strings.Contains(out.String(), other) {
				t.Errorf("the other project's secret was answered: %s", out.String())
			}
			if ok, err := kubelet.MatchImage(tc.key, tc.image); !ok || err != nil {
				t.Errorf("kubelet would not match key %s to %s", tc.key, tc.image)
			}
		})
	}
	// A proxy pull token expires: the cache duration is at most half its life.
	var out bytes.Buffer
	if err := prov.Serve(context.Background(), bytes.NewReader(kubRequest(t, kubProxy+"/ghcr.io/acme/agent:1.4", w.token(kubIssuerA, "team-a", "builder", nil))), &out); err != nil {
		t.Fatal(err)
	}
	resp := kubDecode(t, out.Bytes())
	if a, ok := resp.Auth[kubProxy]; !ok || a.Password == "" || resp.CacheDuration == nil || resp.CacheDuration.Duration > proxy.DefaultKubeletPullTokenTTL/2 {
		t.Errorf("proxy answer %s", out.String())
	}
	// An invalid token is an error, not an empty auth: kubelet logs it.
	out.Reset()
	err = prov.Serve(context.Background(), bytes.NewReader(kubRequest(t, img, "not-a-token")), &out)
	if err == nil || !strings.Contains(err.Error(), "service account token rejected") || out.Len() != 0 {
		t.Errorf("invalid token: %v %s", err, out.String())
	}
}

// TestKubeletProviderBinary runs the plugin program as kubelet does.
func TestKubeletProviderBinary(t *testing.T) {
	t.Parallel()
	bin := testbin.Build(t, "pullsecret-credential-provider")
	w := newKubWorld(t)
	mux := http.NewServeMux()
	mux.Handle(proxy.KubeletAPIPath, w.api)
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	run := func(env []string, args []string, stdin []byte) (string, string, error) {
		cmd := exec.Command(filepath.Join(bin, "pullsecret-credential-provider"), args...)
		cmd.Env = append([]string{"PATH=/usr/bin:/bin", "HOME=" + t.TempDir()}, env...)
		cmd.Stdin = bytes.NewReader(stdin)
		var o, e bytes.Buffer
		cmd.Stdout, cmd.Stderr = &o, &e
		err := cmd.Run()
		return o.String(), e.String(), err
	}
	tokA := w.token(kubIssuerA, "team-a", "builder", nil)
	tokB := w.token(kubIssuerA, "team-b", "web", nil)
	for _, tc := range []struct {
		token, pw string
	}{{tokA, kubAlphaPW}, {tokB, kubBetaPW}, {w.token(kubIssuerA, "nobody", "x", nil), ""}} {
		stdout, stderr, err := run([]string{"PULLSECRET_SERVER=" + srv.URL}, nil, kubRequest(t, "ghcr.io/acme/agent:1.4", tc.token))
		if err != nil {
			t.Fatalf("plugin: %v\n%s", err, stderr)
		}
		resp := kubDecode(t, []byte(stdout))
		if tc.pw == "" {
			if len(resp.Auth) != 0 {
				t.Errorf("unbound: %s", stdout)
			}
			continue
		}
		if resp.Auth["ghcr.io/acme"].Password != tc.pw {
			t.Errorf("plugin answered %s", stdout)
		}
		if strings.Contains(stderr, "eyJ") {
			t.Errorf("stderr holds the token: %s", stderr)
		}
	}
	// Strict decoding: a request kubelet would never send is refused.
	if _, stderr, err := run([]string{"PULLSECRET_SERVER=" + srv.URL}, nil, []byte(`{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderRequest","image":"x","bogus":1}`)); err == nil || !strings.Contains(stderr, `unknown field "bogus"`) {
		t.Errorf("strict decoding: %v %s", err, stderr)
	}
	// A server that does not answer fails within the timeout, not kubelet's minute.
	blackhole := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body) // so that the server notices the client leave
		select {
		case <-r.Context().Done():
		case <-time.After(30 * time.Second):
		}
	}))
	t.Cleanup(blackhole.Close)
	start := time.Now()
	_, stderr, err := run([]string{"PULLSECRET_SERVER=" + blackhole.URL}, []string{"--timeout", "1s"}, kubRequest(t, "ghcr.io/acme/agent:1.4", tokA))
	if err == nil || time.Since(start) > 10*time.Second || !strings.Contains(stderr, "no answer in time") {
		t.Errorf("hanging server: %v after %s: %s", err, time.Since(start), stderr)
	}
	blackhole.CloseClientConnections()
	// Local mode: the project's own store, no server.
	stdout, stderr, err := run([]string{"PULLSECRET_HOME=" + w.store.Home(), "PULLSECRET_PROJECT=beta"}, nil, kubRequest(t, "ghcr.io/acme/agent:1.4", ""))
	if err != nil {
		t.Fatalf("local mode: %v %s", err, stderr)
	}
	if resp := kubDecode(t, []byte(stdout)); resp.Auth["ghcr.io/acme"].Password != kubBetaPW {
		t.Errorf("local mode answered %s", stdout)
	}
}
