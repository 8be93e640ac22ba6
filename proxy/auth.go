package proxy

// Auth is the proxy's Authenticator: it accepts registry tokens (JWTs)
// issued by its token server, and project tokens sent straight on /v2/ as
// the Basic password (or as a Bearer token), and writes the challenges that
// send clients to the token server.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/pullsecret/pullsecret/secret"
)

// Auth defaults.
const (
	// DefaultService is the token service name (the JWT audience).
	DefaultService = "pullsecret"
	// DefaultIssuer is the JWT issuer.
	DefaultIssuer = "pullsecret"
	// DefaultRegistryTokenTTL is the lifetime of an issued registry token.
	DefaultRegistryTokenTTL = 5 * time.Minute
	// DefaultLoginFailures failed logins within DefaultLoginFailureWindow
	// make the next failures answer 429.
	DefaultLoginFailures      = 10
	DefaultLoginFailureWindow = time.Minute

	jwtLeeway         = 30 * time.Second
	maxLimiterEntries = 100_000
)

// ErrInsufficientScope is for Challenge: the client is authenticated but
// its registry token does not grant the scope; the challenge then carries
// error="insufficient_scope" so the client fetches a token for it.
var ErrInsufficientScope = errors.New("insufficient scope")

// ErrStoreUnavailable wraps a failure of the token store itself (its
// database down, say): the client is told 503 and to retry, not that its
// credentials are wrong.
var ErrStoreUnavailable = errors.New("token store unavailable")

// writeUnavailable answers a request the token store could not check.
func writeUnavailable(w http.ResponseWriter) {
	w.Header().Set("Retry-After", "5")
	writeAuthError(w, http.StatusServiceUnavailable, "UNAVAILABLE", "the token store is unreachable; try again shortly")
}

// RateLimitError is returned for a failed login once too many failed: the
// answer is 429 TOOMANYREQUESTS with Retry-After.
type RateLimitError struct {
	RetryAfter time.Duration
}

func (e *RateLimitError) Error() string {
	return fmt.Sprintf("too many failed logins; retry in %d s", retrySeconds(e.RetryAfter))
}

func retrySeconds(d time.Duration) int {
	return max(1, int(math.Ceil(d.Seconds())))
}

// RepositoryFilter reports whether project may be granted anything on
// repository name ("<upstream>/<repo>"), e.g. whether upstream is on the
// project's allowlist. The token server omits what it refuses.
type RepositoryFilter func(ctx context.Context, project, name string) bool

// ProjectSecretsFilter allows a repository when one of the project's pull
// secrets covers it: a project is never granted another project's
// upstreams.
func ProjectSecretsFilter(store *secret.Store) RepositoryFilter {
	return func(ctx context.Context, project, name string) bool {
		t, ok := repositoryTarget(name)
		if !ok {
			return false
		}
		list, err := store.List(ctx, project)
		if err != nil {
			return false
		}
		for _, s := range list {
			for _, p := range s.Registries {
				if p.Match(t) > 0 {
					return true
				}
			}
		}
		return false
	}
}

// Auth authenticates clients of the proxy and issues their registry tokens.
// It implements Authenticator; TokenHandler serves /token.
type Auth struct {
	tokens         *TokenStore
	signer         *Signer
	issuer         string
	service        string
	ttl            time.Duration
	refreshTTL     time.Duration
	external       *url.URL
	trustForwarded bool
	filter         RepositoryFilter
	limiter        *failureLimiter
	log            *slog.Logger
	onFailure      func(reason string)
	now            func() time.Time
}

var _ Authenticator = (*Auth)(nil)

// AuthOption configures NewAuth.
type AuthOption func(*Auth)

// WithIssuer sets the JWT issuer (default DefaultIssuer).
func WithIssuer(s string) AuthOption {
	return func(a *Auth) {
		if s != "" {
			a.issuer = s
		}
	}
}

// WithService sets the service name of challenges and the JWT audience
// (default DefaultService).
func WithService(s string) AuthOption {
	return func(a *Auth) {
		if s != "" {
			a.service = s
		}
	}
}

// WithTokenTTL sets the lifetime of issued registry tokens (default
// DefaultRegistryTokenTTL).
func WithTokenTTL(d time.Duration) AuthOption {
	return func(a *Auth) {
		if d > 0 {
			a.ttl = d
		}
	}
}

// WithRefreshTokenTTL bounds the lifetime of refresh tokens (issued for
// access_type=offline); by default one lives as long as its project token.
func WithRefreshTokenTTL(d time.Duration) AuthOption {
	return func(a *Auth) {
		if d > 0 {
			a.refreshTTL = d
		}
	}
}

// WithExternalURL sets the URL clients reach the server at (see
// ParseExternalURL); the token realm is this URL + "/token". Without it
// the realm is derived from each request's Host (and, with
// WithTrustForwardedHeaders, X-Forwarded-Proto/-Host).
func WithExternalURL(u *url.URL) AuthOption {
	return func(a *Auth) {
		if u != nil {
			c := *u
			a.external = &c
		}
	}
}

// WithTrustForwardedHeaders makes the realm and the client address follow
// X-Forwarded-Proto, X-Forwarded-Host and X-Forwarded-For (the last
// address). Set it only behind a reverse proxy that sets them.
func WithTrustForwardedHeaders(on bool) AuthOption {
	return func(a *Auth) { a.trustForwarded = on }
}

// WithRepositoryFilter restricts grants to repositories f allows, e.g.
// ProjectSecretsFilter or the proxy's upstream allowlist.
func WithRepositoryFilter(f RepositoryFilter) AuthOption {
	return func(a *Auth) { a.filter = f }
}

// WithLoginRateLimit answers 429 to failed logins once more than failures
// failed within window, per project token id (per client address when the
// id is unknown). Successful logins are never limited. failures <= 0
// turns the limit off.
func WithLoginRateLimit(failures int, window time.Duration) AuthOption {
	return func(a *Auth) {
		if failures <= 0 {
			a.limiter = nil
			return
		}
		if window <= 0 {
			window = DefaultLoginFailureWindow
		}
		a.limiter = newFailureLimiter(failures, window)
	}
}

// WithAuthLogger logs failed logins (token id, client address, reason;
// never a credential). Default: no log.
func WithAuthLogger(l *slog.Logger) AuthOption {
	return func(a *Auth) {
		if l != nil {
			a.log = l
		}
	}
}

// WithAuthFailureHook calls fn with a short reason ("invalid", "expired",
// "revoked", "rate-limited", "bad-request") on each failed login, e.g. to
// count them in a metric.
func WithAuthFailureHook(fn func(reason string)) AuthOption {
	return func(a *Auth) { a.onFailure = fn }
}

// WithAuthClock sets the clock (tests).
func WithAuthClock(now func() time.Time) AuthOption {
	return func(a *Auth) {
		if now != nil {
			a.now = now
		}
	}
}

// NewAuth returns the authenticator and token server over tokens, signing
// with signer.
func NewAuth(tokens *TokenStore, signer *Signer, opts ...AuthOption) *Auth {
	a := &Auth{
		tokens: tokens, signer: signer,
		issuer: DefaultIssuer, service: DefaultService, ttl: DefaultRegistryTokenTTL,
		limiter: newFailureLimiter(DefaultLoginFailures, DefaultLoginFailureWindow),
		log:     slog.New(slog.NewTextHandler(io.Discard, nil)),
		now:     time.Now,
	}
	for _, o := range opts {
		o(a)
	}
	return a
}

// ParseExternalURL checks an external URL setting: http or https, a host,
// no user info, query or fragment; a trailing "/" is dropped.
func ParseExternalURL(s string) (*url.URL, error) {
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("external URL %q: want http(s)://HOST[:PORT][/PATH]", tokPrintable(s))
	}
	if u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		return nil, fmt.Errorf("external URL %q: no user info, query or fragment", tokPrintable(u.Redacted()))
	}
	u.Path = strings.TrimRight(u.Path, "/")
	u.RawPath = ""
	return u, nil
}

// Service is the token service name.
func (a *Auth) Service() string { return a.service }

// Tokens is the project token store.
func (a *Auth) Tokens() *TokenStore { return a.tokens }

// ExternalHost is the host[:port] of the configured external URL, "" if
// none is set.
func (a *Auth) ExternalHost() string {
	if a.external == nil {
		return ""
	}
	return a.external.Host
}

// Realm is the token endpoint URL for a request.
func (a *Auth) Realm(r *http.Request) string {
	if a.external != nil {
		return a.external.String() + "/token"
	}
	scheme, host := "http", r.Host
	if r.TLS != nil {
		scheme = "https"
	}
	if a.trustForwarded {
		if p := firstHeaderValue(r.Header.Get("X-Forwarded-Proto")); p == "http" || p == "https" {
			scheme = p
		}
		if h := firstHeaderValue(r.Header.Get("X-Forwarded-Host")); h != "" {
			host = h
		}
	}
	if !validHostHeader(host) {
		host = "localhost"
	}
	return scheme + "://" + host + "/token"
}

func firstHeaderValue(v string) string {
	v, _, _ = strings.Cut(v, ",")
	return strings.TrimSpace(v)
}

// validHostHeader accepts host[:port] and [v6][:port] made of the
// characters host names use.
func validHostHeader(h string) bool {
	if h == "" || len(h) > 261 {
		return false
	}
	for i := 0; i < len(h); i++ {
		c := h[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte(".-_:[]", c) >= 0) {
			return false
		}
	}
	return true
}

// clientAddr is the address failures of unknown tokens are counted
// against: IPv4 address or IPv6 /64.
func (a *Auth) clientAddr(r *http.Request) string {
	host := r.RemoteAddr
	if a.trustForwarded {
		if xff := r.Header.Get("X-Forwarded-For"); xff != "" {
			parts := strings.Split(xff, ",")
			host = strings.TrimSpace(parts[len(parts)-1])
		}
	}
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	ip, err := netip.ParseAddr(strings.Trim(host, "[]"))
	if err != nil {
		return "unknown"
	}
	ip = ip.Unmap().WithZone("")
	if ip.Is6() {
		p, _ := ip.Prefix(64)
		return p.String()
	}
	return ip.String()
}

// principalOf makes the principal of a project token.
func principalOf(info TokenInfo, access []Access) *Principal {
	return &Principal{
		Project:      info.Project,
		TokenID:      info.ID,
		Scopes:       slices.Clone(info.Scopes),
		Access:       access,
		Repositories: slices.Clone(info.Repositories),
	}
}

// Authenticate implements Authenticator. It accepts
//   - "Bearer <JWT>": a registry token from our token server (Access set,
//     never nil, from its access claim);
//   - "Basic <user:project-token>" and "Bearer pst_...": a project token
//     (Access nil: the token's scopes and repository patterns decide).
//
// A registry token stops working as soon as its project token is revoked.
func (a *Auth) Authenticate(r *http.Request) (*Principal, error) {
	h := r.Header.Get("Authorization")
	if strings.TrimSpace(h) == "" {
		return nil, ErrNoAuth
	}
	scheme, cred, _ := strings.Cut(strings.TrimSpace(h), " ")
	cred = strings.TrimSpace(cred)
	switch strings.ToLower(scheme) {
	case "bearer":
		if looksLikeProjectToken(cred) {
			info, err := a.login(r, cred)
			if err != nil {
				return nil, err
			}
			return principalOf(info, nil), nil
		}
		return a.verifyAccess(r.Context(), cred)
	case "basic":
		_, pw, ok := r.BasicAuth()
		if !ok {
			a.failure(r, "", "bad-request")
			return nil, ErrInvalidToken
		}
		info, err := a.login(r, pw)
		if err != nil {
			return nil, err
		}
		return principalOf(info, nil), nil
	}
	a.failure(r, "", "bad-request")
	return nil, ErrInvalidToken
}

// VerifyProjectToken checks a project token presented with r (for the
// credential API), with the failed-login rate limit.
func (a *Auth) VerifyProjectToken(r *http.Request, token string) (*Principal, error) {
	info, err := a.login(r, token)
	if err != nil {
		return nil, err
	}
	return principalOf(info, nil), nil
}

// login verifies a project token, counting failures for the rate limit.
func (a *Auth) login(r *http.Request, tok string) (TokenInfo, error) {
	info, known, err := a.tokens.verify(r.Context(), tok)
	if err == nil {
		return info, nil
	}
	if !errors.Is(err, ErrInvalidToken) && !errors.Is(err, ErrTokenExpired) && !errors.Is(err, ErrTokenRevoked) {
		// The store failed: not the client's fault, not counted.
		a.log.Error("project token lookup failed", "err", err)
		return TokenInfo{}, fmt.Errorf("%w: %w", ErrStoreUnavailable, err)
	}
	id := ""
	key := "addr:" + a.clientAddr(r)
	if known {
		id, _ = ParseTokenID(tok)
		key = "id:" + id
	}
	reason := failureReason(err)
	if a.limiter != nil {
		if wait, limited := a.limiter.fail(key, a.now()); limited {
			a.failure(r, id, "rate-limited")
			return TokenInfo{}, &RateLimitError{RetryAfter: wait}
		}
	}
	a.failure(r, id, reason)
	return TokenInfo{}, err
}

func failureReason(err error) string {
	switch {
	case errors.Is(err, ErrTokenExpired):
		return "expired"
	case errors.Is(err, ErrTokenRevoked):
		return "revoked"
	}
	return "invalid"
}

func (a *Auth) failure(r *http.Request, id, reason string) {
	attrs := []any{"reason", reason, "client", a.clientAddr(r), "path", r.URL.Path}
	if id != "" {
		attrs = append(attrs, "token_id", id)
	}
	a.log.Warn("login failed", attrs...)
	if a.onFailure != nil {
		a.onFailure(reason)
	}
}

// validateJWT checks the registered claims: issuer, audience, times (with
// a small leeway), and that every one we set is there.
func (a *Auth) validateJWT(c jwt.Claims) error {
	if c.Expiry == nil || c.NotBefore == nil || c.IssuedAt == nil || c.ID == "" || !validTokenID(c.Subject) {
		return ErrInvalidToken
	}
	err := c.ValidateWithLeeway(jwt.Expected{Issuer: a.issuer, AnyAudience: jwt.Audience{a.service}, Time: a.now()}, jwtLeeway)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, jwt.ErrExpired):
		return ErrTokenExpired
	}
	return ErrInvalidToken
}

// verifyAccess checks a registry token and the project token it was
// issued for.
func (a *Auth) verifyAccess(ctx context.Context, raw string) (*Principal, error) {
	var c accessClaims
	if err := a.signer.verify(raw, &c); err != nil || c.Use != useAccess {
		return nil, ErrInvalidToken
	}
	if err := a.validateJWT(c.Claims); err != nil {
		return nil, err
	}
	info, err := a.tokens.active(ctx, c.Subject)
	if err != nil {
		return nil, err
	}
	if info.Project != c.Project {
		return nil, ErrInvalidToken
	}
	access := c.Access
	if access == nil {
		access = []Access{}
	}
	return principalOf(info, access), nil
}

// verifyRefresh checks a refresh token and returns its project token.
func (a *Auth) verifyRefresh(ctx context.Context, raw string) (TokenInfo, error) {
	var c refreshClaims
	if err := a.signer.verify(raw, &c); err != nil || c.Use != useRefresh {
		return TokenInfo{}, ErrInvalidToken
	}
	if err := a.validateJWT(c.Claims); err != nil {
		return TokenInfo{}, err
	}
	info, err := a.tokens.active(ctx, c.Subject)
	if err != nil {
		return TokenInfo{}, err
	}
	if info.Project != c.Project {
		return TokenInfo{}, ErrInvalidToken
	}
	return info, nil
}

// tokenActions are the registry actions a project token's scopes allow.
func tokenActions(scopes []string) (pull, push bool) {
	push = slices.Contains(scopes, ScopePush)
	pull = push || slices.Contains(scopes, ScopePull)
	return pull, push
}

// Allows implements Authenticator. The project token's scopes and
// repository patterns always bound what is allowed; a registry token
// further limits it to its access claim, while a project token presented
// straight on /v2/ (Access nil) is also checked against the repository
// filter.
func (a *Auth) Allows(p *Principal, name, action string) bool {
	if p == nil {
		return false
	}
	pull, push := tokenActions(p.Scopes)
	switch action {
	case "pull":
		if !pull {
			return false
		}
	case "push":
		if !push {
			return false
		}
	default:
		return false
	}
	t, ok := repositoryTarget(name)
	if !ok || !reposAllow(p.Repositories, t) {
		return false
	}
	if p.Access != nil {
		for _, e := range p.Access {
			if e.Type == "repository" && e.Name == name && (slices.Contains(e.Actions, action) || slices.Contains(e.Actions, "*")) {
				return true
			}
		}
		return false
	}
	if a.filter != nil && !a.filter(context.Background(), p.Project, name) {
		return false
	}
	return true
}

// Challenge implements Authenticator: 401 with
//
//	WWW-Authenticate: Bearer realm="<realm>",service="<service>",scope="<scope>"
//
// (plus error="insufficient_scope" or error="invalid_token" as distribution
// sends them) and a registry JSON error; or 429 TOOMANYREQUESTS with
// Retry-After when err is a *RateLimitError. The message never quotes a
// credential.
func (a *Auth) Challenge(w http.ResponseWriter, r *http.Request, scope string, err error) {
	var rl *RateLimitError
	if errors.As(err, &rl) {
		writeTooManyRequests(w, rl)
		return
	}
	if errors.Is(err, ErrStoreUnavailable) {
		writeUnavailable(w)
		return
	}
	v := "Bearer realm=" + quoteParam(a.Realm(r)) + ",service=" + quoteParam(a.service)
	if scope != "" {
		v += ",scope=" + quoteParam(scope)
	}
	switch {
	case errors.Is(err, ErrInsufficientScope):
		v += `,error="insufficient_scope"`
	case errors.Is(err, ErrInvalidToken), errors.Is(err, ErrTokenExpired), errors.Is(err, ErrTokenRevoked):
		v += `,error="invalid_token"`
	}
	w.Header().Set("WWW-Authenticate", v)
	w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
	writeAuthError(w, http.StatusUnauthorized, "UNAUTHORIZED", authMessage(err, scope))
}

// authMessage is what a client is told about an authentication failure.
func authMessage(err error, scope string) string {
	switch {
	case err == nil, errors.Is(err, ErrNoAuth):
		return "authentication required: log in with a project token (pullsecret token create)"
	case errors.Is(err, ErrInsufficientScope):
		if scope != "" {
			return "access to " + tokPrintable(scope) + " is not granted to this token"
		}
		return "access not granted to this token"
	case errors.Is(err, ErrTokenRevoked):
		return "the project token was revoked"
	case errors.Is(err, ErrTokenExpired):
		return "token expired"
	case errors.Is(err, ErrInvalidToken):
		return "invalid credentials"
	}
	return "authentication failed"
}

// quoteParam quotes an auth-param value (RFC 7230 quoted-string).
func quoteParam(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range s {
		switch {
		case r == '"' || r == '\\':
			b.WriteByte('\\')
			b.WriteRune(r)
		case r < 0x20 || r == 0x7f:
		default:
			b.WriteRune(r)
		}
	}
	b.WriteByte('"')
	return b.String()
}

// writeAuthError writes a registry-style JSON error.
func writeAuthError(w http.ResponseWriter, status int, code, message string) {
	body, _ := json.Marshal(map[string]any{
		"errors": []map[string]string{{"code": code, "message": message}},
	})
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

func writeTooManyRequests(w http.ResponseWriter, rl *RateLimitError) {
	s := retrySeconds(rl.RetryAfter)
	w.Header().Set("Retry-After", strconv.Itoa(s))
	writeAuthError(w, http.StatusTooManyRequests, "TOOMANYREQUESTS",
		fmt.Sprintf("too many failed logins; retry in %d s", s))
}

// failureLimiter counts failed logins per key in fixed windows.
type failureLimiter struct {
	max    int
	window time.Duration

	mu      sync.Mutex
	entries map[string]*limiterEntry
}

type limiterEntry struct {
	start time.Time
	count int
}

func newFailureLimiter(maxFailures int, window time.Duration) *failureLimiter {
	return &failureLimiter{max: maxFailures, window: window, entries: map[string]*limiterEntry{}}
}

// fail records a failure for key and reports whether it is over the
// limit, and how long until the window ends.
func (l *failureLimiter) fail(key string, now time.Time) (time.Duration, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	e, ok := l.entries[key]
	if !ok || now.Sub(e.start) >= l.window || now.Before(e.start) {
		if !ok && len(l.entries) >= maxLimiterEntries {
			l.sweep(now)
		}
		e = &limiterEntry{start: now}
		l.entries[key] = e
	}
	e.count++
	if e.count > l.max {
		return e.start.Add(l.window).Sub(now), true
	}
	return 0, false
}

// sweep drops ended windows, and if that is not enough, arbitrary ones:
// the map stays bounded whatever the clients send.
func (l *failureLimiter) sweep(now time.Time) {
	for k, e := range l.entries {
		if now.Sub(e.start) >= l.window {
			delete(l.entries, k)
		}
	}
	for k := range l.entries {
		if len(l.entries) < maxLimiterEntries*9/10 {
			break
		}
		delete(l.entries, k)
	}
}
