package registry

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/distribution/distribution/v3/configuration"
)

// tokenPath is where the token endpoint lives, on the registry's own
// host:port: go-containerregistry refuses a realm on a loopback IP with a
// different port than the registry.
const tokenPath = "/token"

// tokenIssuer is a minimal Docker token server
// (https://distribution.github.io/distribution/spec/auth/token/ and the
// OAuth2 variant in .../auth/oauth/).
//
// distribution's token access controller verifies, in this order (see
// registry/auth/token in v3.1.2): the JWS algorithm is in its allowed list;
// the signing key is trusted, either through an x5c chain to rootcertbundle
// or through the "kid" header naming a key from rootcertbundle (by JWK
// thumbprint) or from the jwks file; "iss" equals its issuer; "aud" contains
// its service; exp/nbf hold with 60 s leeway; and "access" covers every
// (type, name, action) the request needs. We sign with Ed25519 and publish
// the public key in a JWKS file under a kid, which needs no certificate and
// no JOSE library.
type tokenIssuer struct {
	realm, service, issuer string
	kid                    string
	key                    ed25519.PrivateKey
	jwksPath               string
	users                  *userStore
	ttl                    time.Duration

	mu      sync.Mutex
	refresh map[string]refreshGrant
}

type refreshGrant struct {
	user string
	gen  uint64
}

func newTokenIssuer(dir, realm, service string, users *userStore, ttl time.Duration) (*tokenIssuer, error) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("registry: token signing key: %w", err)
	}
	sum := sha256.Sum256(pub)
	t := &tokenIssuer{
		realm:    realm,
		service:  service,
		issuer:   "pullsecret-test-token-issuer",
		kid:      base64.RawURLEncoding.EncodeToString(sum[:12]),
		key:      priv,
		jwksPath: filepath.Join(dir, "jwks.json"),
		users:    users,
		ttl:      ttl,
		refresh:  map[string]refreshGrant{},
	}
	jwks, err := json.Marshal(map[string]any{"keys": []map[string]string{{
		"kty": "OKP",
		"crv": "Ed25519",
		"x":   base64.RawURLEncoding.EncodeToString(pub),
		"kid": t.kid,
		"alg": "EdDSA",
		"use": "sig",
	}}})
	if err != nil {
		return nil, fmt.Errorf("registry: encode jwks: %w", err)
	}
	if err := os.WriteFile(t.jwksPath, jwks, 0o600); err != nil {
		return nil, fmt.Errorf("registry: write jwks: %w", err)
	}
	return t, nil
}

// distributionParameters configures distribution's token access controller
// to trust this issuer and nothing else.
func (t *tokenIssuer) distributionParameters() configuration.Parameters {
	return configuration.Parameters{
		"realm":   t.realm,
		"service": t.service,
		"issuer":  t.issuer,
		"jwks":    t.jwksPath,
		// Only what we sign with: distribution's default list includes the
		// HMAC algorithms too.
		"signingalgorithms": []any{"EdDSA"},
	}
}

// ServeHTTP answers GET /token (Basic credentials, service and scope in the
// query) and POST /token (OAuth2 form: grant_type password or
// refresh_token). containerd tries POST first; Docker and
// go-containerregistry use GET.
func (t *tokenIssuer) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	var (
		user, pass string
		ok         bool
		scopes     []string
		offline    bool
		refresh    string
	)
	switch req.Method {
	case http.MethodGet:
		q := req.URL.Query()
		user, pass, ok = req.BasicAuth()
		scopes = q["scope"]
		offline = q.Get("offline_token") == "true"
		if s := q.Get("service"); s != "" && s != t.service {
			writeError(w, http.StatusBadRequest, "UNSUPPORTED", fmt.Sprintf("unknown service %q", s))
			return
		}
	case http.MethodPost:
		if err := req.ParseForm(); err != nil {
			writeError(w, http.StatusBadRequest, "UNSUPPORTED", "malformed form")
			return
		}
		f := req.PostForm
		if s := f.Get("service"); s != "" && s != t.service {
			writeError(w, http.StatusBadRequest, "UNSUPPORTED", fmt.Sprintf("unknown service %q", s))
			return
		}
		scopes = f["scope"]
		offline = f.Get("access_type") == "offline"
		switch f.Get("grant_type") {
		case "password":
			user, pass = f.Get("username"), f.Get("password")
			ok = user != ""
		case "refresh_token":
			refresh = f.Get("refresh_token")
			user, ok = t.redeem(refresh)
			if !ok {
				writeError(w, http.StatusUnauthorized, "UNAUTHORIZED", "invalid refresh token")
				return
			}
		default:
			writeError(w, http.StatusBadRequest, "UNSUPPORTED", "unsupported grant_type")
			return
		}
	default:
		w.Header().Set("Allow", "GET, POST")
		writeError(w, http.StatusMethodNotAllowed, "UNSUPPORTED", "method not allowed")
		return
	}
	if refresh == "" && (!ok || !t.users.check(user, pass)) {
		w.Header().Set("WWW-Authenticate", fmt.Sprintf("Basic realm=%q", basicRealm))
		writeError(w, http.StatusUnauthorized, "UNAUTHORIZED", "authentication required")
		return
	}
	access, err := parseScopes(scopes)
	if err != nil {
		writeError(w, http.StatusBadRequest, "UNSUPPORTED", err.Error())
		return
	}

	now := time.Now()
	tok, err := t.sign(user, access, now)
	if err != nil {
		writeError(w, http.StatusInternalServerError, "UNKNOWN", "cannot sign token")
		return
	}
	resp := map[string]any{
		"token":        tok,
		"access_token": tok,
		"expires_in":   int(t.ttl / time.Second),
		"issued_at":    now.UTC().Format(time.RFC3339),
	}
	if offline {
		if refresh == "" {
			refresh = t.newRefreshToken(user)
		}
		resp["refresh_token"] = refresh
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	_ = json.NewEncoder(w).Encode(resp)
}

func (t *tokenIssuer) newRefreshToken(user string) string {
	gen, _ := t.users.generation(user)
	tok := randomHex(24)
	t.mu.Lock()
	t.refresh[tok] = refreshGrant{user: user, gen: gen}
	t.mu.Unlock()
	return tok
}

// redeem returns the user of a refresh token that is still valid: the user
// exists and its password has not changed since the token was issued.
func (t *tokenIssuer) redeem(tok string) (string, bool) {
	if tok == "" {
		return "", false
	}
	t.mu.Lock()
	g, ok := t.refresh[tok]
	t.mu.Unlock()
	if !ok {
		return "", false
	}
	gen, exists := t.users.generation(g.user)
	if !exists || gen != g.gen {
		return "", false
	}
	return g.user, true
}

// resourceActions is one entry of the JWT's "access" claim.
type resourceActions struct {
	Type    string   `json:"type"`
	Name    string   `json:"name"`
	Actions []string `json:"actions"`
}

// parseScopes parses "type:name:action,action" scopes (several per value,
// space-separated, as the OAuth form sends them). The name may itself
// contain ':' (a registry host with a port), so type ends at the first ':'
// and the actions start after the last. Every authenticated user is granted
// everything asked for: access control is not what this registry tests.
func parseScopes(values []string) ([]resourceActions, error) {
	access := []resourceActions{}
	for _, v := range values {
		for s := range strings.FieldsSeq(v) {
			typ, rest, ok1 := strings.Cut(s, ":")
			i := strings.LastIndex(rest, ":")
			if !ok1 || i <= 0 || typ == "" {
				return nil, fmt.Errorf("malformed scope %q", s)
			}
			name, actions := rest[:i], strings.Split(rest[i+1:], ",")
			access = append(access, resourceActions{Type: typ, Name: name, Actions: actions})
		}
	}
	return access, nil
}

// sign returns a compact JWS (EdDSA) of the claims distribution expects.
func (t *tokenIssuer) sign(subject string, access []resourceActions, now time.Time) (string, error) {
	header, err := json.Marshal(map[string]string{"alg": "EdDSA", "typ": "JWT", "kid": t.kid})
	if err != nil {
		return "", err
	}
	claims, err := json.Marshal(map[string]any{
		"iss":    t.issuer,
		"sub":    subject,
		"aud":    t.service,
		"exp":    now.Add(t.ttl).Unix(),
		"nbf":    now.Add(-time.Second).Unix(),
		"iat":    now.Unix(),
		"jti":    randomHex(12),
		"access": access,
	})
	if err != nil {
		return "", err
	}
	enc := base64.RawURLEncoding
	signingInput := enc.EncodeToString(header) + "." + enc.EncodeToString(claims)
	sig := ed25519.Sign(t.key, []byte(signingInput))
	return signingInput + "." + enc.EncodeToString(sig), nil
}
