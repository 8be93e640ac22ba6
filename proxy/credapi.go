package proxy

// The credential API of the helpers' remote mode:
//
//	POST /api/v1/credentials
//	Authorization: Bearer <project token>
//	{"registry": "ghcr.io", "repository": "acme/app"}
//
// answers {"username", "secret", "expires_at"?} with the project's pull
// secret for that registry (username "<token>" for an identity token). It
// needs the token's credentials scope, and the token's repository patterns
// must cover the target (a request naming no repository is covered only by
// a whole-registry pattern, or by a token without patterns).
//
// For the proxy's own host (the Host the API was reached at, or
// X-Forwarded-Host with WithTrustForwardedHeaders, the external URL's host,
// and the hosts WithProxyHosts names) it answers the project
// token itself as an identity token, so clients log in to the proxy with
// no upstream secret; that needs only the pull scope.

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/pullsecret/pullsecret/audit"
	"github.com/pullsecret/pullsecret/secret"
)

// CredentialAPIPath is where NewCredentialAPI's handler is mounted.
const CredentialAPIPath = "/api/v1/credentials"

// TokenUsername is the username that marks a secret as an identity token
// in the docker-credential-helpers protocol.
const TokenUsername = "<token>"

const maxCredentialRequest = 64 << 10

// CredentialRequest is the body of a credential API request.
type CredentialRequest struct {
	// Registry is the server URL a client asked the helper for, in any
	// form the helpers' callers send ("ghcr.io", "https://ghcr.io/v1/",
	// "ghcr.io/acme/app").
	Registry string `json:"registry"`
	// Repository, when set, is the repository path on Registry.
	Repository string `json:"repository,omitempty"`
}

// CredentialResponse is the answer of the credential API.
type CredentialResponse struct {
	Username  string     `json:"username"`
	Secret    string     `json:"secret"`
	ExpiresAt *time.Time `json:"expires_at,omitempty"`
}

// String never prints the secret.
func (c CredentialResponse) String() string {
	return fmt.Sprintf("CredentialResponse{username=%q, secret=REDACTED}", c.Username)
}

// GoString keeps %#v from printing the secret.
func (c CredentialResponse) GoString() string { return c.String() }

// CredentialAPIOption configures NewCredentialAPI.
type CredentialAPIOption func(*credentialAPI)

// WithProxyHosts names the proxy's own hosts (host[:port], as clients
// address it) besides the request's Host and the external URL's host.
func WithProxyHosts(hosts ...string) CredentialAPIOption {
	return func(c *credentialAPI) {
		for _, h := range hosts {
			if h = strings.TrimSpace(h); h == "" {
				continue
			}
			c.proxyHosts[canonicalProxyHost(h, "")] = true
		}
	}
}

// WithCredentialLogger logs each answered request (project, token id,
// registry, pull secret name; never a credential). Default: no log.
func WithCredentialLogger(l *slog.Logger) CredentialAPIOption {
	return func(c *credentialAPI) {
		if l != nil {
			c.log = l
		}
	}
}

type credentialAPI struct {
	auth       *Auth
	store      *secret.Store
	proxyHosts map[string]bool
	log        *slog.Logger
	audit      audit.Log // nil: no audit trail
}

// NewCredentialAPI returns the handler of POST /api/v1/credentials.
func NewCredentialAPI(auth *Auth, store *secret.Store, opts ...CredentialAPIOption) http.Handler {
	c := &credentialAPI{auth: auth, store: store, proxyHosts: map[string]bool{},
		log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	for _, o := range opts {
		o(c)
	}
	if h := auth.ExternalHost(); h != "" {
		c.proxyHosts[canonicalProxyHost(h, auth.external.Scheme)] = true
	}
	return c
}

// canonicalProxyHost puts a host in the form secret.ParseServerURL gives.
func canonicalProxyHost(h, scheme string) string {
	s := h
	if scheme != "" {
		s = scheme + "://" + h
	}
	if t, err := secret.ParseServerURL(s); err == nil {
		return t.Host
	}
	return strings.ToLower(h)
}

func (c *credentialAPI) isProxyHost(r *http.Request, host string) bool {
	if c.proxyHosts[host] {
		return true
	}
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	if validHostHeader(r.Host) && canonicalProxyHost(r.Host, scheme) == host {
		return true
	}
	if c.auth.trustForwarded {
		fh := firstHeaderValue(r.Header.Get("X-Forwarded-Host"))
		if p := firstHeaderValue(r.Header.Get("X-Forwarded-Proto")); p == "http" || p == "https" {
			scheme = p
		}
		return validHostHeader(fh) && canonicalProxyHost(fh, scheme) == host
	}
	return false
}

func (c *credentialAPI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// ev is this request's audit event; every exit below decides it.
	ev := audit.Event{Time: time.Now().UTC(), Client: auditClient(r, c.auth.trustForwarded),
		Action: audit.ActionCredential, Via: audit.ViaHelper}
	if c.audit != nil {
		defer func() { recordAudit(r.Context(), c.audit, c.log, ev) }()
	}
	// writeAuthError, shadowed here, also decides the audit event.
	writeAuthError := func(w http.ResponseWriter, status int, code, msg string) {
		ev.Decision, ev.Status, ev.Reason = audit.Denied, status, msg
		if status >= 500 && ev.Project != "" {
			// Authorized, but resolving failed: not a refusal.
			ev.Decision = audit.Allowed
		}
		writeAuthError(w, status, code, msg)
	}
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", "POST")
		writeAuthError(w, http.StatusMethodNotAllowed, "UNSUPPORTED", "the credential API takes POST")
		return
	}
	scheme, tok, _ := strings.Cut(strings.TrimSpace(r.Header.Get("Authorization")), " ")
	tok = strings.TrimSpace(tok)
	if !strings.EqualFold(scheme, "bearer") || tok == "" {
		w.Header().Set("WWW-Authenticate", "Bearer realm="+quoteParam(c.auth.service))
		writeAuthError(w, http.StatusUnauthorized, "UNAUTHORIZED", "send a project token as Authorization: Bearer <token>")
		return
	}
	info, err := c.auth.login(r, tok)
	if err != nil {
		if errors.Is(err, ErrTokenExpired) || errors.Is(err, ErrTokenRevoked) {
			// The store knows this token: name it (its id, never it).
			ev.TokenID, _ = ParseTokenID(tok)
		}
		var rl *RateLimitError
		switch {
		case errors.As(err, &rl):
			ev.Decision, ev.Status, ev.Reason = audit.Denied, http.StatusTooManyRequests, "too many failed logins"
			writeTooManyRequests(w, rl)
		case errors.Is(err, ErrInvalidToken) && !looksLikeProjectToken(tok):
			writeAuthError(w, http.StatusUnauthorized, "UNAUTHORIZED", "the credential API takes a project token (pst_...), not a registry token")
		case errors.Is(err, ErrInvalidToken), errors.Is(err, ErrTokenExpired), errors.Is(err, ErrTokenRevoked):
			writeAuthError(w, http.StatusUnauthorized, "UNAUTHORIZED", authMessage(err, ""))
		case errors.Is(err, ErrStoreUnavailable):
			writeUnavailable(w)
		default:
			writeAuthError(w, http.StatusInternalServerError, "UNKNOWN", "the token store failed; see the server log")
		}
		return
	}
	ev.Project, ev.TokenID = info.Project, info.ID
	var req CredentialRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxCredentialRequest))
	if err := dec.Decode(&req); err != nil {
		writeAuthError(w, http.StatusBadRequest, "UNSUPPORTED", `want a JSON body {"registry": "...", "repository": "..."}`)
		return
	}
	t, err := secret.ParseServerURL(req.Registry)
	if err != nil {
		writeAuthError(w, http.StatusBadRequest, "NAME_INVALID", "registry: "+err.Error())
		return
	}
	if repo := strings.Trim(req.Repository, "/"); repo != "" {
		rt, err := secret.ParseServerURL(t.Host + "/" + repo)
		if err != nil || rt.Repo != repo {
			writeAuthError(w, http.StatusBadRequest, "NAME_INVALID", fmt.Sprintf("invalid repository %q", tokPrintable(repo)))
			return
		}
		t.Repo = rt.Repo
	}
	attrs := []any{"project", info.Project, "token_id", info.ID, "registry", t.String()}
	ev.Upstream, ev.Repository = t.Host, t.Repo

	if c.isProxyHost(r, t.Host) {
		if pull, _ := tokenActions(info.Scopes); !pull {
			writeAuthError(w, http.StatusForbidden, "DENIED", "this project token has no pull scope, which logging in to the proxy needs")
			return
		}
		exp := info.Expires.UTC()
		c.log.Info("credential answered", append(attrs, "kind", "proxy-token")...)
		ev.Decision, ev.Status, ev.Reason = audit.Allowed, http.StatusOK, "the project token itself, to log in to this proxy"
		writeCredential(w, CredentialResponse{Username: TokenUsername, Secret: tok, ExpiresAt: &exp})
		return
	}
	if !info.scopesHas(ScopeCredentials) {
		writeAuthError(w, http.StatusForbidden, "DENIED", "this project token lacks the credentials scope (pullsecret token create --scope credentials)")
		return
	}
	if !reposAllow(info.Repositories, t) {
		writeAuthError(w, http.StatusForbidden, "DENIED", fmt.Sprintf("this project token's repository patterns do not cover %s", t))
		return
	}
	sec, cred, err := c.store.Resolve(r.Context(), info.Project, t)
	if errors.Is(err, secret.ErrNotFound) {
		writeAuthError(w, http.StatusNotFound, "NOT_FOUND", fmt.Sprintf("no pull secret of project %s covers %s", info.Project, t))
		return
	}
	if err != nil {
		// Store and provider errors name secrets and registries, never
		// values.
		c.log.Warn("credential resolution failed", append(attrs, "err", err)...)
		writeAuthError(w, http.StatusBadGateway, "UNKNOWN", "resolving the pull secret failed: "+err.Error())
		return
	}
	resp := CredentialResponse{Username: cred.Username, Secret: cred.Password}
	if cred.IdentityToken != "" {
		resp = CredentialResponse{Username: TokenUsername, Secret: cred.IdentityToken}
	}
	if !cred.Expires.IsZero() {
		exp := cred.Expires.UTC()
		resp.ExpiresAt = &exp
	}
	c.log.Info("credential answered", append(attrs, "kind", "pull-secret", "secret", sec.Name)...)
	ev.Decision, ev.Status, ev.Secret = audit.Allowed, http.StatusOK, sec.Name
	writeCredential(w, resp)
}

func (t TokenInfo) scopesHas(scope string) bool {
	for _, s := range t.Scopes {
		if s == scope {
			return true
		}
	}
	return false
}

func writeCredential(w http.ResponseWriter, resp CredentialResponse) {
	body, _ := json.Marshal(resp)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(body)
}
