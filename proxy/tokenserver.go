package proxy

// The token server: the registry Bearer token flow on /token, on the same
// host:port as /v2/.
//
//	GET  /token?service=S&scope=A&scope=B   Authorization: Basic (any user,
//	     password = project token); offline_token=true adds a refresh token.
//	POST /token   form: grant_type=password (username, password) or
//	     grant_type=refresh_token (refresh_token), service, scope,
//	     client_id, access_type=offline (adds a refresh token).
//
// The answer is {"token","access_token","expires_in","issued_at"} plus
// "refresh_token" when asked for and "scope" (what was granted). The
// access claim holds what was asked ∩ the token's scopes ∩ its repository
// patterns ∩ the repository filter; anything else is left out, as
// registries do, so the request that needs it gets 401/403 later. No scope
// gives a token with empty access (the /v2/ ping).
//
// Refresh tokens are JWTs signed like access tokens, with token_use
// "refresh": they name the project token, are good only as a refresh_token
// grant here, and stop working when the project token expires or is
// revoked. grant_type=refresh_token also takes a project token itself, which
// is what clients send when the helper hands them the project token as an
// identity token.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"mime"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/go-jose/go-jose/v4/jwt"
)

// Token request limits.
const (
	maxScopes      = 64
	maxScopeLen    = 1024
	maxTokenFormSz = 64 << 10
)

// ParseScopes parses the scope parameters of a token request. Each value
// holds one or more space-separated scopes "type[(class)]:name:actions"
// (the name may contain ':' as in "host:5000/repo"; actions are
// comma-separated). Scopes on the same resource are merged, in the order
// they first appear. At most 64 scopes are accepted.
func ParseScopes(values []string) ([]Access, error) {
	var out []Access
	n := 0
	for _, v := range values {
		for _, s := range strings.Fields(v) {
			n++
			if n > maxScopes {
				return nil, fmt.Errorf("more than %d scopes", maxScopes)
			}
			a, err := parseScope(s)
			if err != nil {
				return nil, err
			}
			i := slices.IndexFunc(out, func(x Access) bool { return x.Type == a.Type && x.Name == a.Name })
			if i < 0 {
				out = append(out, a)
				continue
			}
			for _, act := range a.Actions {
				if !slices.Contains(out[i].Actions, act) {
					out[i].Actions = append(out[i].Actions, act)
				}
			}
		}
	}
	return out, nil
}

func parseScope(s string) (Access, error) {
	bad := func() (Access, error) {
		return Access{}, fmt.Errorf("invalid scope %q: want type:name:actions", tokPrintable(s))
	}
	if len(s) > maxScopeLen {
		return Access{}, fmt.Errorf("scope longer than %d characters", maxScopeLen)
	}
	i, j := strings.IndexByte(s, ':'), strings.LastIndexByte(s, ':')
	if i <= 0 || j == i {
		return bad()
	}
	typ, name, acts := s[:i], s[i+1:j], s[j+1:]
	if k := strings.IndexByte(typ, '('); k >= 0 {
		if !strings.HasSuffix(typ, ")") || k == 0 {
			return bad()
		}
		typ = typ[:k]
	}
	if !isScopeWord(typ, false) || name == "" || acts == "" {
		return bad()
	}
	for k := 0; k < len(name); k++ {
		if c := name[k]; c <= 0x20 || c >= 0x7f {
			return bad()
		}
	}
	var actions []string
	for _, a := range strings.Split(acts, ",") {
		if a == "" {
			continue
		}
		if !isScopeWord(a, true) {
			return bad()
		}
		if !slices.Contains(actions, a) {
			actions = append(actions, a)
		}
	}
	if len(actions) == 0 {
		return bad()
	}
	return Access{Type: typ, Name: name, Actions: actions}, nil
}

func isScopeWord(s string, star bool) bool {
	if s == "" || len(s) > 64 {
		return false
	}
	if star && s == "*" {
		return true
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// scopeString is the space-separated scope list of access.
func scopeString(access []Access) string {
	parts := make([]string, 0, len(access))
	for _, a := range access {
		parts = append(parts, a.Type+":"+a.Name+":"+strings.Join(a.Actions, ","))
	}
	return strings.Join(parts, " ")
}

// grant is what the token info may have of what was asked.
func (a *Auth) grant(ctx context.Context, info TokenInfo, asked []Access) []Access {
	pull, push := tokenActions(info.Scopes)
	out := []Access{}
	for _, s := range asked {
		if s.Type != "repository" {
			continue // no registry:catalog:* or anything else
		}
		t, ok := repositoryTarget(s.Name)
		if !ok || !reposAllow(info.Repositories, t) {
			continue
		}
		all := slices.Contains(s.Actions, "*")
		var acts []string
		if pull && (all || slices.Contains(s.Actions, "pull")) {
			acts = append(acts, "pull")
		}
		if push && (all || slices.Contains(s.Actions, "push")) {
			acts = append(acts, "push")
		}
		if len(acts) == 0 {
			continue
		}
		if a.filter != nil && !a.filter(ctx, info.Project, s.Name) {
			continue
		}
		out = append(out, Access{Type: "repository", Name: s.Name, Actions: acts})
	}
	return out
}

// tokenResponse is the token server's answer.
type tokenResponse struct {
	Token        string `json:"token"`
	AccessToken  string `json:"access_token"`
	ExpiresIn    int    `json:"expires_in"`
	IssuedAt     string `json:"issued_at"`
	RefreshToken string `json:"refresh_token,omitempty"`
	Scope        string `json:"scope,omitempty"`
}

// issue signs a registry token granting what info may have of asked, and
// a refresh token when offline.
func (a *Auth) issue(ctx context.Context, info TokenInfo, asked []Access, offline bool) (tokenResponse, error) {
	now := a.now().UTC().Truncate(time.Second)
	exp := now.Add(a.ttl)
	if info.Expires.Before(exp) {
		exp = info.Expires
	}
	granted := a.grant(ctx, info, asked)
	claims := accessClaims{
		Claims: jwt.Claims{
			Issuer: a.issuer, Subject: info.ID, Audience: jwt.Audience{a.service},
			Expiry: jwt.NewNumericDate(exp), NotBefore: jwt.NewNumericDate(now), IssuedAt: jwt.NewNumericDate(now),
			ID: jti(),
		},
		Project: info.Project, Use: useAccess, Access: granted,
	}
	tok, err := a.signer.sign(claims)
	if err != nil {
		return tokenResponse{}, fmt.Errorf("sign registry token: %w", err)
	}
	resp := tokenResponse{
		Token: tok, AccessToken: tok, ExpiresIn: max(1, int(exp.Sub(now).Seconds())),
		IssuedAt: now.Format(time.RFC3339), Scope: scopeString(granted),
	}
	if offline {
		rexp := info.Expires
		if a.refreshTTL > 0 && now.Add(a.refreshTTL).Before(rexp) {
			rexp = now.Add(a.refreshTTL)
		}
		rc := refreshClaims{
			Claims: jwt.Claims{
				Issuer: a.issuer, Subject: info.ID, Audience: jwt.Audience{a.service},
				Expiry: jwt.NewNumericDate(rexp), NotBefore: jwt.NewNumericDate(now), IssuedAt: jwt.NewNumericDate(now),
				ID: jti(),
			},
			Project: info.Project, Use: useRefresh,
		}
		if resp.RefreshToken, err = a.signer.sign(rc); err != nil {
			return tokenResponse{}, fmt.Errorf("sign refresh token: %w", err)
		}
	}
	a.log.Debug("registry token issued", "token_id", info.ID, "project", info.Project, "scope", resp.Scope)
	return resp, nil
}

// IssueRegistryToken verifies a project token and returns a registry token
// granting what it may have of scopes (e.g. "repository:ghcr.io/acme/app:pull"),
// as /token would; for tests and tools. It is not rate limited.
func (a *Auth) IssueRegistryToken(ctx context.Context, projectToken string, scopes ...string) (string, error) {
	info, err := a.tokens.Verify(ctx, projectToken)
	if err != nil {
		return "", err
	}
	asked, err := ParseScopes(scopes)
	if err != nil {
		return "", err
	}
	resp, err := a.issue(ctx, info, asked, false)
	return resp.Token, err
}

// TokenHandler serves the token endpoint; mount it at "/token" on the
// same host:port as /v2/.
func (a *Auth) TokenHandler() http.Handler { return http.HandlerFunc(a.serveToken) }

func (a *Auth) serveToken(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Pragma", "no-cache")
	switch r.Method {
	case http.MethodGet:
		a.tokenGet(w, r)
	case http.MethodPost:
		a.tokenPost(w, r)
	default:
		w.Header().Set("Allow", "GET, POST")
		writeAuthError(w, http.StatusMethodNotAllowed, "UNSUPPORTED", "the token endpoint takes GET or POST")
	}
}

func (a *Auth) checkService(w http.ResponseWriter, svc string) bool {
	if svc != "" && svc != a.service {
		writeAuthError(w, http.StatusBadRequest, "UNSUPPORTED", fmt.Sprintf("unknown service %q (this token server is %q)", tokPrintable(svc), a.service))
		return false
	}
	return true
}

func (a *Auth) tokenGet(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	if !a.checkService(w, q.Get("service")) {
		return
	}
	asked, err := ParseScopes(q["scope"])
	if err != nil {
		writeAuthError(w, http.StatusBadRequest, "UNSUPPORTED", err.Error())
		return
	}
	_, pw, ok := r.BasicAuth()
	if !ok || pw == "" {
		w.Header().Set("WWW-Authenticate", "Basic realm="+quoteParam(a.service))
		writeAuthError(w, http.StatusUnauthorized, "UNAUTHORIZED", "authentication required: use Basic auth with a project token as the password")
		return
	}
	info, err := a.login(r, pw)
	if err != nil {
		a.tokenError(w, err)
		return
	}
	a.respond(w, r, info, asked, q.Get("offline_token") == "true")
}

func (a *Auth) tokenPost(w http.ResponseWriter, r *http.Request) {
	mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if err != nil || mt != "application/x-www-form-urlencoded" {
		writeAuthError(w, http.StatusBadRequest, "UNSUPPORTED", "want an application/x-www-form-urlencoded form")
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, maxTokenFormSz)
	if err := r.ParseForm(); err != nil {
		writeAuthError(w, http.StatusBadRequest, "UNSUPPORTED", "invalid form")
		return
	}
	f := r.PostForm
	if !a.checkService(w, f.Get("service")) {
		return
	}
	asked, err := ParseScopes(f["scope"])
	if err != nil {
		writeAuthError(w, http.StatusBadRequest, "UNSUPPORTED", err.Error())
		return
	}
	var info TokenInfo
	switch gt := f.Get("grant_type"); gt {
	case "password":
		info, err = a.login(r, f.Get("password"))
	case "refresh_token":
		rt := f.Get("refresh_token")
		if looksLikeProjectToken(rt) {
			info, err = a.login(r, rt)
		} else if info, err = a.verifyRefresh(r.Context(), rt); err != nil {
			a.failure(r, "", failureReason(err))
		}
	default:
		writeAuthError(w, http.StatusBadRequest, "UNSUPPORTED", fmt.Sprintf("unsupported grant_type %q (want password or refresh_token)", tokPrintable(gt)))
		return
	}
	if err != nil {
		a.tokenError(w, err)
		return
	}
	a.respond(w, r, info, asked, f.Get("access_type") == "offline")
}

// tokenError answers a failed login at the token endpoint.
func (a *Auth) tokenError(w http.ResponseWriter, err error) {
	var rl *RateLimitError
	switch {
	case errors.As(err, &rl):
		writeTooManyRequests(w, rl)
	case errors.Is(err, ErrInvalidToken), errors.Is(err, ErrTokenExpired), errors.Is(err, ErrTokenRevoked):
		writeAuthError(w, http.StatusUnauthorized, "UNAUTHORIZED", authMessage(err, ""))
	case errors.Is(err, ErrStoreUnavailable):
		writeUnavailable(w)
	default:
		writeAuthError(w, http.StatusInternalServerError, "UNKNOWN", "the token store failed; see the server log")
	}
}

func (a *Auth) respond(w http.ResponseWriter, r *http.Request, info TokenInfo, asked []Access, offline bool) {
	resp, err := a.issue(r.Context(), info, asked, offline)
	if err != nil {
		a.log.Error("issue registry token", "token_id", info.ID, "err", err)
		writeAuthError(w, http.StatusInternalServerError, "UNKNOWN", "could not issue a token; see the server log")
		return
	}
	body, _ := json.Marshal(resp)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(body)
}
