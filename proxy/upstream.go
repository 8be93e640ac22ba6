package proxy

// Upstream connections: one guarded HTTP transport (the dialer refuses
// private addresses after DNS resolution), and on top of it
// go-containerregistry's transports, which do the ping and the bearer token
// dance. A ggcr transport caches its upstream token, so instances are kept
// in an LRU keyed by (upstream, credential identity, scope) and shared by
// every request with that key. The credential identity is an HMAC of the
// credential under a per-process key: the raw password is never a key.
//
// Host binding (DESIGN.md invariant 4): every request a ggcr transport
// sends goes through hostBound, which lets it reach only the upstream host
// itself or a host on the upstream's registrable domain (a token realm such
// as auth.docker.io for docker.io). Redirects are not followed by ggcr:
// fetch follows them itself, and a redirect to another host (a blob on
// object storage) is fetched through the plain transport, which never
// carries an Authorization header.

import (
	"container/list"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/pullsecret/pullsecret/internal/netguard"
	"github.com/pullsecret/pullsecret/secret"
	"golang.org/x/net/publicsuffix"
	"golang.org/x/sync/singleflight"
)

const (
	sessionCacheSize = 1024
	// sessionIdle drops a cached upstream session unused for this long.
	sessionIdle = 30 * time.Minute
	// credentialMargin renews a session this long before its credential
	// (an ECR token) expires.
	credentialMargin = time.Minute
	maxRedirects     = 5
)

// upstreams talks to upstream registries on behalf of projects.
type upstreams struct {
	secrets    SecretSource
	base       *http.Transport   // guarded, carries no credentials by itself
	plain      http.RoundTripper // base, stripping any credential header
	insecure   map[string]bool
	reqTimeout time.Duration
	idKey      []byte // HMAC key for credential identities
	metrics    *metrics
	now        func() time.Time

	mu       sync.Mutex
	sessions map[string]*list.Element
	lru      *list.List
	sf       singleflight.Group
}

// session is an authenticated connection to one upstream for one
// credential and scope set.
type session struct {
	key      string
	rt       http.RoundTripper // ggcr transport over hostBound
	reg      name.Registry
	host     string // reg.RegistryStr(): the host the API is reached at
	withCred bool
	expires  time.Time // zero: no expiry of its own
	lastUsed time.Time
}

func newUpstreams(cfg Config, secrets SecretSource, m *metrics) (*upstreams, error) {
	uc := cfg.Upstream
	d := &netguard.Dialer{Policy: cfg.AllowPrivateUpstreams.Policy, Timeout: uc.DialTimeout, KeepAlive: 30 * time.Second}
	tlsCfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if len(uc.CAFiles) > 0 {
		pool, err := x509.SystemCertPool()
		if err != nil || pool == nil {
			pool = x509.NewCertPool()
		}
		for _, f := range uc.CAFiles {
			b, err := os.ReadFile(f)
			if err != nil {
				return nil, fmt.Errorf("upstream.ca_files: %w", err)
			}
			if !pool.AppendCertsFromPEM(b) {
				return nil, fmt.Errorf("upstream.ca_files: %s holds no PEM certificate", f)
			}
		}
		tlsCfg.RootCAs = pool
	}
	base := &http.Transport{
		// No proxy from the environment: the dialer's address check must see
		// the upstream's own address.
		Proxy:                 nil,
		DialContext:           d.DialContext,
		ForceAttemptHTTP2:     true,
		TLSClientConfig:       tlsCfg,
		TLSHandshakeTimeout:   uc.TLSHandshakeTimeout,
		ResponseHeaderTimeout: uc.ResponseHeaderTimeout,
		IdleConnTimeout:       uc.IdleConnTimeout,
		MaxIdleConns:          256,
		MaxIdleConnsPerHost:   uc.MaxIdleConnsPerHost,
		ExpectContinueTimeout: time.Second,
		// Blobs are content-addressed bytes: never let the transport
		// decompress them (nor drop Content-Length).
		DisableCompression: true,
		ReadBufferSize:     64 << 10,
		WriteBufferSize:    64 << 10,
	}
	key := make([]byte, 32)
	rand.Read(key)
	u := &upstreams{
		secrets:    secrets,
		base:       base,
		plain:      stripCredentials{base},
		insecure:   map[string]bool{},
		reqTimeout: uc.RequestTimeout,
		idKey:      key,
		metrics:    m,
		now:        time.Now,
		sessions:   map[string]*list.Element{},
		lru:        list.New(),
	}
	for _, h := range cfg.InsecureUpstreams {
		u.insecure[h] = true
	}
	return u, nil
}

func (u *upstreams) close() { u.base.CloseIdleConnections() }

// credentialID is a stable, non-reversible identity of a credential.
func (u *upstreams) credentialID(c secret.Credential) string {
	m := hmac.New(sha256.New, u.idKey)
	m.Write([]byte(c.Username))
	m.Write([]byte{0})
	m.Write([]byte(c.Password))
	m.Write([]byte{0})
	m.Write([]byte(c.IdentityToken))
	return hex.EncodeToString(m.Sum(nil)[:16])
}

// pullScope and pushScope are the upstream token scopes for repo.
func pullScope(repo string) string { return "repository:" + repo + ":pull" }
func pushScope(repo string) string { return "repository:" + repo + ":pull,push" }

// session returns the authenticated session for t with scopes, creating it
// (ping, token exchange) if needed. The project's credential is resolved
// now, at request time: a rotated or deleted secret takes effect at once.
func (u *upstreams) session(ctx context.Context, t Target, scopes ...string) (*session, error) {
	_, cred, err := u.secrets.Resolve(ctx, t.Project, secret.Target{Host: t.Upstream, Repo: t.Repo})
	withCred := true
	switch {
	case errors.Is(err, secret.ErrNotFound):
		// The upstream is allowed (an alias, or a secret whose pattern
		// covers other repositories of this host): pull anonymously.
		cred, withCred = secret.Credential{}, false
	case err != nil:
		return nil, newError(http.StatusBadGateway, CodeUnavailable, "could not obtain project %s's credential for %s", t.Project, t.Upstream).withCause(err)
	}
	id := "anonymous"
	if withCred {
		id = u.credentialID(cred)
	}
	key := t.Upstream + " " + id + " " + strings.Join(scopes, " ")
	now := u.now()
	if s := u.get(key, now); s != nil {
		return s, nil
	}
	ch := u.sf.DoChan(key, func() (any, error) {
		// Shared by every waiter: not bound to one client's context.
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), u.reqTimeout)
		defer cancel()
		s, err := u.newSession(cctx, t, cred, withCred, scopes)
		if err != nil {
			return nil, err
		}
		s.key = key
		u.put(s)
		return s, nil
	})
	select {
	case <-ctx.Done():
		return nil, ctx.Err()
	case res := <-ch:
		if res.Err != nil {
			e := mapTransportError(t, res.Err, withCred)
			if withCred && e.Cause != nil {
				e.Cause = scrubbed{e.Cause, cred}
			}
			return nil, e
		}
		return res.Val.(*session), nil
	}
}

func (u *upstreams) newSession(ctx context.Context, t Target, cred secret.Credential, withCred bool, scopes []string) (*session, error) {
	var opts []name.Option
	if u.insecure[t.Upstream] {
		opts = append(opts, name.Insecure)
	}
	reg, err := name.NewRegistry(t.Upstream, opts...)
	if err != nil {
		return nil, newError(http.StatusBadRequest, CodeNameInvalid, "invalid upstream %q", t.Upstream).withCause(err)
	}
	auth := authn.Anonymous
	if withCred {
		auth = authn.FromConfig(authn.AuthConfig{Username: cred.Username, Password: cred.Password, IdentityToken: cred.IdentityToken})
	}
	bound := transport.NewUserAgent(&hostBound{inner: u.base, upstream: reg.RegistryStr()}, "pullsecret")
	start := time.Now()
	rt, err := transport.NewWithContext(ctx, reg, auth, bound, scopes)
	u.metrics.upstreamLatency(t.Upstream, "auth", time.Since(start))
	if err != nil {
		return nil, err
	}
	s := &session{rt: rt, reg: reg, host: reg.RegistryStr(), withCred: withCred, expires: cred.Expires}
	return s, nil
}

func (u *upstreams) get(key string, now time.Time) *session {
	u.mu.Lock()
	defer u.mu.Unlock()
	el, ok := u.sessions[key]
	if !ok {
		return nil
	}
	s := el.Value.(*session)
	if now.Sub(s.lastUsed) > sessionIdle || (!s.expires.IsZero() && now.After(s.expires.Add(-credentialMargin))) {
		u.lru.Remove(el)
		delete(u.sessions, key)
		return nil
	}
	s.lastUsed = now
	u.lru.MoveToFront(el)
	return s
}

func (u *upstreams) put(s *session) {
	u.mu.Lock()
	defer u.mu.Unlock()
	s.lastUsed = u.now()
	if el, ok := u.sessions[s.key]; ok {
		el.Value = s
		u.lru.MoveToFront(el)
		return
	}
	u.sessions[s.key] = u.lru.PushFront(s)
	for u.lru.Len() > sessionCacheSize {
		old := u.lru.Back()
		u.lru.Remove(old)
		delete(u.sessions, old.Value.(*session).key)
	}
}

// drop forgets a session, e.g. after the upstream rejected its token.
func (u *upstreams) drop(s *session) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if el, ok := u.sessions[s.key]; ok && el.Value == s {
		u.lru.Remove(el)
		delete(u.sessions, s.key)
	}
}

// url is the upstream URL of an API path ("/v2/<repo>/...").
func (s *session) url(path string, q url.Values) string {
	u := "https://" + s.host + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	return u
}

// do sends req through the session and follows redirects of GET and HEAD
// requests itself: to the upstream host with the session, anywhere else
// through the plain transport, without credentials. The headers of a
// redirected request are rebuilt from keep, never copied (ggcr sets
// Authorization on the request it is given).
func (u *upstreams) do(s *session, req *http.Request, op string) (*http.Response, error) {
	keep := http.Header{}
	for _, k := range []string{"Accept", "Range", "If-None-Match"} {
		if v := req.Header.Values(k); len(v) > 0 {
			keep[k] = slices.Clone(v)
		}
	}
	start := time.Now()
	rt := s.rt
	for hop := 0; ; hop++ {
		resp, err := rt.RoundTrip(req)
		if err != nil {
			return nil, err
		}
		if !isRedirect(resp.StatusCode) || (req.Method != http.MethodGet && req.Method != http.MethodHead) {
			u.metrics.upstreamLatency(hostOnly(s.host), op, time.Since(start))
			return resp, nil
		}
		loc := resp.Header.Get("Location")
		drain(resp)
		if loc == "" {
			return nil, fmt.Errorf("redirect %d without a Location", resp.StatusCode)
		}
		if hop >= maxRedirects {
			return nil, fmt.Errorf("stopped after %d redirects", maxRedirects)
		}
		next, err := req.URL.Parse(loc)
		if err != nil || (next.Scheme != "http" && next.Scheme != "https") || next.Host == "" {
			return nil, errors.New("redirect to an invalid location")
		}
		if next.User != nil {
			next.User = nil
		}
		nreq, err := http.NewRequestWithContext(req.Context(), req.Method, next.String(), nil)
		if err != nil {
			return nil, err
		}
		nreq.Header = keep.Clone()
		if sameHost(next, s.host) {
			rt = s.rt
		} else {
			rt = u.plain
		}
		req = nreq
	}
}

func isRedirect(code int) bool {
	switch code {
	case http.StatusMovedPermanently, http.StatusFound, http.StatusSeeOther,
		http.StatusTemporaryRedirect, http.StatusPermanentRedirect:
		return true
	}
	return false
}

// drain discards a little of an unwanted body so the connection can be
// reused, then closes it.
func drain(resp *http.Response) {
	buf := make([]byte, 4096)
	for i := 0; i < 16; i++ {
		if _, err := resp.Body.Read(buf); err != nil {
			break
		}
	}
	resp.Body.Close()
}

// sameHost reports whether u addresses host (host[:port], default ports
// folded).
func sameHost(u *url.URL, host string) bool {
	return canonicalAddr(u.Host, u.Scheme) == canonicalAddr(host, u.Scheme)
}

func canonicalAddr(hostport, scheme string) string {
	h, p, err := net.SplitHostPort(hostport)
	if err != nil {
		h = strings.Trim(hostport, "[]")
		p = ""
	}
	if p == "" {
		p = "443"
		if scheme == "http" {
			p = "80"
		}
	}
	return net.JoinHostPort(strings.ToLower(h), p)
}

func hostOnly(hostport string) string {
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		return strings.ToLower(h)
	}
	return strings.ToLower(strings.Trim(hostport, "[]"))
}

// realmRefusedError is returned by hostBound for a request to a host off
// the upstream's domain.
type realmRefusedError struct {
	upstream string
	host     string
}

func (e *realmRefusedError) Error() string {
	return fmt.Sprintf("refusing to contact %s on behalf of upstream %s: not on the upstream's domain, so the project's credentials are not sent there", e.host, e.upstream)
}

// hostBound is the RoundTripper given to go-containerregistry: it lets
// requests reach only the upstream host and hosts on its registrable
// domain (eTLD+1). Every credential ggcr sends passes through it.
type hostBound struct {
	inner    http.RoundTripper
	upstream string // host[:port] the registry API is reached at
}

func (h *hostBound) RoundTrip(req *http.Request) (*http.Response, error) {
	if !sameDomain(hostOnly(h.upstream), hostOnly(req.URL.Host)) {
		if req.Body != nil {
			req.Body.Close()
		}
		return nil, &realmRefusedError{upstream: h.upstream, host: req.URL.Host}
	}
	return h.inner.RoundTrip(req)
}

// sameDomain reports whether host b may receive credentials meant for
// upstream a: the same host, or both DNS names under the same registrable
// domain (auth.docker.io for index.docker.io). IP addresses and single-label
// names only match themselves.
func sameDomain(a, b string) bool {
	if a == b {
		return true
	}
	if _, err := netip.ParseAddr(a); err == nil {
		return false
	}
	if _, err := netip.ParseAddr(b); err == nil {
		return false
	}
	if !strings.Contains(a, ".") || !strings.Contains(b, ".") {
		return false
	}
	da, err := publicsuffix.EffectiveTLDPlusOne(a)
	if err != nil {
		return false
	}
	db, err := publicsuffix.EffectiveTLDPlusOne(b)
	if err != nil {
		return false
	}
	return da == db
}

// stripCredentials sends requests without Authorization, Cookie or
// Proxy-Authorization, whatever the caller set.
type stripCredentials struct{ inner http.RoundTripper }

func (s stripCredentials) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.Header.Get("Authorization") != "" || req.Header.Get("Cookie") != "" || req.Header.Get("Proxy-Authorization") != "" {
		req = req.Clone(req.Context())
		req.Header.Del("Authorization")
		req.Header.Del("Cookie")
		req.Header.Del("Proxy-Authorization")
	}
	return s.inner.RoundTrip(req)
}

// scrubbed is an error whose text has a credential's values removed; it
// still unwraps to the original for errors.Is/As.
type scrubbed struct {
	err  error
	cred secret.Credential
}

func (s scrubbed) Error() string {
	msg := s.err.Error()
	for _, v := range []string{s.cred.Password, s.cred.IdentityToken,
		base64.StdEncoding.EncodeToString([]byte(s.cred.Username + ":" + s.cred.Password))} {
		if len(v) >= 4 {
			msg = strings.ReplaceAll(msg, v, "REDACTED")
		}
	}
	return msg
}

func (s scrubbed) Unwrap() error { return s.err }
