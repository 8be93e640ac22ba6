package proxy

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/pullsecret/pullsecret/registry"
	"github.com/pullsecret/pullsecret/secret"
)

// pxCanary is the upstream password every proxy test uses: it must never
// show up in a log line, a metric or a response body.
const pxCanary = "canary-UPSTREAM-pw-3c1f9e77"

const pxUser = "robot"

// pxLog is a concurrency-safe log capture.
type pxLog struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *pxLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *pxLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// pxFixture is a proxy with a real Auth and token server over a sealed
// store in a temporary home.
type pxFixture struct {
	t      testing.TB
	ctx    context.Context
	home   string
	store  *secret.Store
	tokens *TokenStore
	auth   *Auth
	srv    *Server
	hs     *httptest.Server
	host   string // 127.0.0.1:PORT of the proxy
	logs   *pxLog
}

type pxOption func(*Config)

func newPX(t testing.TB, opts ...pxOption) *pxFixture {
	t.Helper()
	return newPXWith(t, nil, opts...)
}

// newPXWith is newPX with extra server options (a fetcher wrapper).
func newPXWith(t testing.TB, sopts []Option, opts ...pxOption) *pxFixture {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	home := t.TempDir()
	store, err := secret.Open(home)
	if err != nil {
		t.Fatal(err)
	}
	cfg := DefaultConfig()
	if err := cfg.AllowPrivateUpstreams.Set([]string{"127.0.0.1/32"}); err != nil {
		t.Fatal(err)
	}
	cfg.Upstream.RequestTimeout = 20 * time.Second
	for _, o := range opts {
		o(&cfg)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	tokens, err := NewTokenStore(home)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := LoadSigner(home)
	if err != nil {
		t.Fatal(err)
	}
	logs := &pxLog{}
	logger := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	auth := NewAuth(tokens, signer, WithRepositoryFilter(AllowlistFilter(cfg, store)), WithAuthLogger(logger))
	srv, err := New(cfg, store, auth, append([]Option{WithLogger(logger), WithHandler("/token", auth.TokenHandler())}, sopts...)...)
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(srv.Handler())
	f := &pxFixture{t: t, ctx: ctx, home: home, store: store, tokens: tokens, auth: auth, srv: srv, hs: hs,
		host: strings.TrimPrefix(hs.URL, "http://"), logs: logs}
	t.Cleanup(func() {
		// Invariant 1: the canary never leaks into logs or metrics.
		m := f.get("/metrics", "")
		body, _ := io.ReadAll(m.Body)
		m.Body.Close()
		hs.Close()
		srv.Close()
		if strings.Contains(logs.String(), pxCanary) {
			t.Errorf("the upstream password appears in the proxy log:\n%s", logs.String())
		}
		if strings.Contains(string(body), pxCanary) {
			t.Errorf("the upstream password appears in /metrics")
		}
	})
	return f
}

func withAliases(m map[string]string) pxOption {
	return func(c *Config) { c.Aliases = m }
}

// addSecret stores a basic pull secret for registry in project.
func (f *pxFixture) addSecret(project, nm, reg, user, pass string) {
	f.t.Helper()
	p, err := secret.ParsePattern(reg)
	if err != nil {
		f.t.Fatal(err)
	}
	if _, err := f.store.Put(f.ctx, secret.Secret{Project: project, Name: nm, Kind: secret.Basic, Registries: []secret.Pattern{p}},
		secret.Value{Username: user, Password: pass}); err != nil {
		f.t.Fatal(err)
	}
}

// token creates a project token.
func (f *pxFixture) token(project string, scopes ...string) string {
	f.t.Helper()
	tok, _, err := f.tokens.Create(f.ctx, TokenSpec{Project: project, Scopes: scopes})
	if err != nil {
		f.t.Fatal(err)
	}
	return tok
}

// remote options of a client logging in to the proxy with a project token.
func (f *pxFixture) client(tok string) []remote.Option {
	return []remote.Option{
		remote.WithContext(f.ctx),
		remote.WithAuth(&authn.Basic{Username: "ci", Password: tok}),
		remote.WithTransport(http.DefaultTransport.(*http.Transport).Clone()),
	}
}

func (f *pxFixture) ref(s string) name.Reference {
	f.t.Helper()
	r, err := name.ParseReference(f.host+"/"+s, name.Insecure)
	if err != nil {
		f.t.Fatal(err)
	}
	return r
}

// get does a raw request on the proxy with the project token as Basic
// password (Auth accepts it straight on /v2/).
func (f *pxFixture) get(path, tok string, hdr ...string) *http.Response {
	return f.do(http.MethodGet, path, tok, nil, hdr...)
}

func (f *pxFixture) do(method, path, tok string, body io.Reader, hdr ...string) *http.Response {
	f.t.Helper()
	req, err := http.NewRequestWithContext(f.ctx, method, f.hs.URL+path, body)
	if err != nil {
		f.t.Fatal(err)
	}
	if tok != "" {
		req.SetBasicAuth("ci", tok)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		f.t.Fatal(err)
	}
	return resp
}

// readAll reads and closes a response body, and checks it for the canary.
func (f *pxFixture) readAll(resp *http.Response) string {
	f.t.Helper()
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		f.t.Fatalf("reading body: %v", err)
	}
	if strings.Contains(string(b), pxCanary) {
		f.t.Errorf("the upstream password appears in a response body: %s", b)
	}
	return string(b)
}

// upstream starts an in-process registry with htpasswd (or token) auth for
// pxUser/pxCanary.
func pxUpstream(t testing.TB, token bool, opts ...registry.Option) *registry.Registry {
	t.Helper()
	users := map[string]string{pxUser: pxCanary}
	if token {
		opts = append(opts, registry.WithTokenAuth(users))
	} else {
		opts = append(opts, registry.WithHTPasswd(users))
	}
	r, err := registry.Start(context.Background(), opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// direct are remote options for talking to an upstream directly.
func pxDirect(ctx context.Context) []remote.Option {
	return []remote.Option{remote.WithContext(ctx), remote.WithAuth(&authn.Basic{Username: pxUser, Password: pxCanary})}
}

// errorCode extracts the first registry error code and message of a body.
func errorCode(body string) (code, msg string) {
	i := strings.Index(body, `"code":"`)
	if i < 0 {
		return "", ""
	}
	rest := body[i+8:]
	code = rest[:strings.IndexByte(rest, '"')]
	if j := strings.Index(body, `"message":"`); j >= 0 {
		r := body[j+11:]
		msg = r[:strings.IndexByte(r, '"')]
	}
	return code, msg
}
