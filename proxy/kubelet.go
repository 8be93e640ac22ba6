package proxy

// The server side of pullsecret-credential-provider's service-account-token
// mode (KEP-4412): kubelet hands the plugin the pod's projected service
// account token; the plugin posts it here with the image; this handler
// verifies the token against the cluster's keys, maps the service account
// to a project through the configured bindings and answers with that
// project's credential for the image — never another project's. An image on
// the proxy itself gets a short-lived proxy pull token instead.

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/pullsecret/pullsecret/secret"
)

// KubeletAPIPath is where NewKubeletAPI's handler is mounted.
const KubeletAPIPath = "/api/v1/kubelet/credentials"

// Defaults of the kubelet API.
const (
	DefaultKubeletPullTokenTTL = 15 * time.Minute
	DefaultKubeletLeeway       = time.Minute
	kubeletMaxBody             = 64 << 10
)

// KubeletConfig is the kubelet API's configuration, as it appears under
// `kubelet:` in the server's YAML config:
//
//	kubelet:
//	  issuers:
//	    - issuer: https://kubernetes.default.svc.cluster.local
//	      audience: pullsecret            # tokenAttributes.serviceAccountTokenAudience
//	      jwks_file: /etc/pullsecret/cluster-a.jwks.json   # kubectl get --raw /openid/v1/jwks
//	  bindings:
//	    - {namespace: team-a, service_account: builder, project: acme}
//	    - {namespace: team-b, service_account: "*", project: beta}
//	  proxy_hosts: [pullsecret.internal:5000]
//	  pull_token_ttl: 15m
type KubeletConfig struct {
	// Issuers are the clusters whose service account tokens are accepted.
	Issuers []KubeletIssuer `yaml:"issuers" json:"issuers"`
	// Bindings map service accounts to projects. A service account with no
	// binding gets no credential.
	Bindings []KubeletBinding `yaml:"bindings" json:"bindings"`
	// ProxyHosts are this server's own registry host[:port] names: an image
	// on one of them is answered with a proxy pull token for the project.
	ProxyHosts []string `yaml:"proxy_hosts" json:"proxy_hosts"`
	// PullTokenTTL is the life of those pull tokens (default 15m).
	PullTokenTTL time.Duration `yaml:"pull_token_ttl" json:"pull_token_ttl"`
	// Leeway is the clock skew allowed on exp, nbf and iat (default 1m).
	Leeway time.Duration `yaml:"leeway" json:"leeway"`
}

// KubeletIssuer is one cluster's service account token issuer.
type KubeletIssuer struct {
	// Issuer is the token's "iss" (the API server's
	// --service-account-issuer).
	Issuer string `yaml:"issuer" json:"issuer"`
	// Audience must be in the token's "aud": the provider config's
	// tokenAttributes.serviceAccountTokenAudience.
	Audience string `yaml:"audience" json:"audience"`
	// The verification keys: a JWKS document inline or in a file (the API
	// server's /openid/v1/jwks), and/or PEM public keys in a file (its
	// --service-account-key-file). RS256 and ES256 are accepted.
	JWKS           string `yaml:"jwks" json:"jwks"`
	JWKSFile       string `yaml:"jwks_file" json:"jwks_file"`
	PublicKeysFile string `yaml:"public_keys_file" json:"public_keys_file"`
}

// KubeletBinding binds a service account to a project.
type KubeletBinding struct {
	// Issuer selects the cluster; it may be left out when only one issuer
	// is configured.
	Issuer    string `yaml:"issuer" json:"issuer"`
	Namespace string `yaml:"namespace" json:"namespace"`
	// ServiceAccount is the account's name, or "*" for every account of the
	// namespace (an exact name wins over "*").
	ServiceAccount string `yaml:"service_account" json:"service_account"`
	Project        string `yaml:"project" json:"project"`
}

// CredentialResolver resolves a project's pull secret for a registry and
// repository at pull time. *secret.Store satisfies it.
type CredentialResolver interface {
	Resolve(ctx context.Context, project string, t secret.Target) (secret.Secret, secret.Credential, error)
}

// PullTokenIssuer issues short-lived project tokens that pull through the
// proxy. repository ("<upstream>/<repo>") narrows the token to that
// repository when the issuer supports it.
type PullTokenIssuer interface {
	IssuePullToken(ctx context.Context, project, repository string, ttl time.Duration) (token string, expires time.Time, err error)
}

// KubeletAuditEvent records one kubelet credential request. It never holds
// a token or a credential.
type KubeletAuditEvent struct {
	Time           time.Time
	Issuer         string
	Namespace      string
	ServiceAccount string
	Pod            string
	Project        string
	Image          string
	Registry       string // the auth key answered, if any
	Secret         string // the pull secret used, if any
	Outcome        string // "credential", "pull-token", "no-binding", "no-match", "invalid-token", "bad-request", "error"
	Reason         string
	Client         string // the plugin's address (the node)
	TokenID        string // the id of the pull token issued, if any
	Status         int    // the HTTP status answered
}

// KubeletOption configures NewKubeletAPI.
type KubeletOption func(*KubeletAPI)

// WithKubeletPullTokens lets the API answer images on ProxyHosts with
// proxy pull tokens.
func WithKubeletPullTokens(t PullTokenIssuer) KubeletOption {
	return func(k *KubeletAPI) { k.tokens = t }
}

// WithKubeletAudit calls fn for every request.
func WithKubeletAudit(fn func(KubeletAuditEvent)) KubeletOption {
	return func(k *KubeletAPI) { k.audit = fn }
}

// WithKubeletClock sets the clock used to check tokens.
func WithKubeletClock(now func() time.Time) KubeletOption {
	return func(k *KubeletAPI) { k.now = now }
}

// KubeletAPI serves POST /api/v1/kubelet/credentials.
type KubeletAPI struct {
	issuers    []*kubeletIssuer
	bindings   []KubeletBinding
	proxyHosts map[string]bool
	ttl        time.Duration
	leeway     time.Duration
	resolver   CredentialResolver
	tokens     PullTokenIssuer
	audit      func(KubeletAuditEvent)
	now        func() time.Time
}

type kubeletIssuer struct {
	KubeletIssuer
	keys jose.JSONWebKeySet
}

// NewKubeletAPI checks cfg, loads the issuers' keys and returns the
// handler. Mount it at KubeletAPIPath.
func NewKubeletAPI(cfg KubeletConfig, resolver CredentialResolver, opts ...KubeletOption) (*KubeletAPI, error) {
	if resolver == nil {
		return nil, errors.New("kubelet API: no credential resolver")
	}
	k := &KubeletAPI{
		resolver:   resolver,
		proxyHosts: map[string]bool{},
		ttl:        cfg.PullTokenTTL,
		leeway:     cfg.Leeway,
		now:        time.Now,
	}
	if k.ttl <= 0 {
		k.ttl = DefaultKubeletPullTokenTTL
	}
	if k.leeway <= 0 {
		k.leeway = DefaultKubeletLeeway
	}
	for _, o := range opts {
		o(k)
	}
	if len(cfg.Issuers) == 0 {
		return nil, errors.New("kubelet: at least one issuer is required")
	}
	seen := map[string]bool{}
	for i, is := range cfg.Issuers {
		if is.Issuer == "" {
			return nil, fmt.Errorf("kubelet.issuers[%d]: issuer is required", i)
		}
		if is.Audience == "" {
			return nil, fmt.Errorf("kubelet.issuers[%d] (%s): audience is required (the provider's tokenAttributes.serviceAccountTokenAudience)", i, is.Issuer)
		}
		if seen[is.Issuer] {
			return nil, fmt.Errorf("kubelet.issuers[%d]: issuer %s given twice", i, is.Issuer)
		}
		seen[is.Issuer] = true
		keys, err := kubeletLoadKeys(is)
		if err != nil {
			return nil, fmt.Errorf("kubelet.issuers[%d] (%s): %w", i, is.Issuer, err)
		}
		k.issuers = append(k.issuers, &kubeletIssuer{KubeletIssuer: is, keys: keys})
	}
	type bkey struct{ iss, ns, sa string }
	bseen := map[bkey]bool{}
	for i, b := range cfg.Bindings {
		if b.Issuer == "" {
			if len(cfg.Issuers) > 1 {
				return nil, fmt.Errorf("kubelet.bindings[%d]: issuer is required when several issuers are configured", i)
			}
			b.Issuer = cfg.Issuers[0].Issuer
		} else if !seen[b.Issuer] {
			return nil, fmt.Errorf("kubelet.bindings[%d]: issuer %s is not configured", i, b.Issuer)
		}
		if b.Namespace == "" || b.ServiceAccount == "" {
			return nil, fmt.Errorf("kubelet.bindings[%d]: namespace and service_account are required", i)
		}
		if err := secret.ValidName(b.Project); err != nil {
			return nil, fmt.Errorf("kubelet.bindings[%d]: project: %w", i, err)
		}
		key := bkey{b.Issuer, b.Namespace, b.ServiceAccount}
		if bseen[key] {
			return nil, fmt.Errorf("kubelet.bindings[%d]: %s/%s is bound twice", i, b.Namespace, b.ServiceAccount)
		}
		bseen[key] = true
		k.bindings = append(k.bindings, b)
	}
	for _, h := range cfg.ProxyHosts {
		t, err := secret.ParseServerURL(h)
		if err != nil || t.Repo != "" {
			return nil, fmt.Errorf("kubelet.proxy_hosts: %q is not a host[:port]", h)
		}
		k.proxyHosts[t.Host] = true
	}
	return k, nil
}

// kubeletLoadKeys reads an issuer's verification keys.
func kubeletLoadKeys(is KubeletIssuer) (jose.JSONWebKeySet, error) {
	var set jose.JSONWebKeySet
	add := func(src string, data []byte) error {
		var s jose.JSONWebKeySet
		if err := json.Unmarshal(data, &s); err != nil {
			return fmt.Errorf("%s: not a JWKS document: %w", src, err)
		}
		set.Keys = append(set.Keys, s.Keys...)
		return nil
	}
	if is.JWKS != "" {
		if err := add("jwks", []byte(is.JWKS)); err != nil {
			return set, err
		}
	}
	if is.JWKSFile != "" {
		b, err := os.ReadFile(is.JWKSFile)
		if err != nil {
			return set, err
		}
		if err := add(is.JWKSFile, b); err != nil {
			return set, err
		}
	}
	if is.PublicKeysFile != "" {
		b, err := os.ReadFile(is.PublicKeysFile)
		if err != nil {
			return set, err
		}
		keys, err := kubeletParsePEMKeys(b)
		if err != nil {
			return set, fmt.Errorf("%s: %w", is.PublicKeysFile, err)
		}
		set.Keys = append(set.Keys, keys...)
	}
	var usable []jose.JSONWebKey
	for _, k := range set.Keys {
		if !k.Valid() {
			return set, fmt.Errorf("key %q is not valid", k.KeyID)
		}
		if k.Use != "" && k.Use != "sig" {
			continue
		}
		switch pk := k.Key.(type) {
		case *rsa.PublicKey:
			if pk.N.BitLen() < 2048 {
				return set, fmt.Errorf("key %q: RSA keys shorter than 2048 bits are refused", k.KeyID)
			}
		case *ecdsa.PublicKey:
			if pk.Curve != elliptic.P256() {
				return set, fmt.Errorf("key %q: only P-256 ECDSA keys (ES256) are accepted", k.KeyID)
			}
		default:
			return set, fmt.Errorf("key %q: want a public RSA or P-256 ECDSA key (a private key does not belong in a verification key set)", k.KeyID)
		}
		usable = append(usable, k)
	}
	if len(usable) == 0 {
		return set, errors.New("no verification key: set jwks, jwks_file or public_keys_file")
	}
	set.Keys = usable
	return set, nil
}

func kubeletParsePEMKeys(data []byte) ([]jose.JSONWebKey, error) {
	var keys []jose.JSONWebKey
	for {
		var blk *pem.Block
		blk, data = pem.Decode(data)
		if blk == nil {
			break
		}
		var pub any
		var err error
		switch blk.Type {
		case "PUBLIC KEY":
			pub, err = x509.ParsePKIXPublicKey(blk.Bytes)
		case "RSA PUBLIC KEY":
			pub, err = x509.ParsePKCS1PublicKey(blk.Bytes)
		case "CERTIFICATE":
			var c *x509.Certificate
			if c, err = x509.ParseCertificate(blk.Bytes); err == nil {
				pub = c.PublicKey
			}
		default:
			return nil, fmt.Errorf("PEM block %q: want PUBLIC KEY or CERTIFICATE", blk.Type)
		}
		if err != nil {
			return nil, err
		}
		keys = append(keys, jose.JSONWebKey{Key: pub, Use: "sig"})
	}
	if len(keys) == 0 {
		return nil, errors.New("no PEM public key")
	}
	return keys, nil
}

// kubeletRequest mirrors kubelet.KubeletCredentialRequest.
type kubeletRequest struct {
	Image                     string            `json:"image"`
	ServiceAccountToken       string            `json:"service_account_token"`
	ServiceAccountAnnotations map[string]string `json:"service_account_annotations,omitempty"`
}

// kubeletResponse mirrors kubelet.KubeletCredentialResponse.
type kubeletResponse struct {
	Registry      string     `json:"registry"`
	CacheKeyType  string     `json:"cache_key_type,omitempty"`
	Username      string     `json:"username,omitempty"`
	Password      string     `json:"password,omitempty"`
	IdentityToken string     `json:"identity_token,omitempty"`
	ExpiresAt     *time.Time `json:"expires_at,omitempty"`
}

// kubeletSAClaims are the claims of a projected service account token.
type kubeletSAClaims struct {
	jwt.Claims
	Kubernetes *struct {
		Namespace      string `json:"namespace"`
		ServiceAccount *struct {
			Name string `json:"name"`
			UID  string `json:"uid"`
		} `json:"serviceaccount"`
		Pod *struct {
			Name string `json:"name"`
		} `json:"pod"`
	} `json:"kubernetes.io"`
}

// kubeletIdentity is a verified service account.
type kubeletIdentity struct {
	issuer, namespace, name, pod string
}

// errKubeletToken is a token that does not verify; its text is safe to
// return to the caller.
type errKubeletToken struct{ reason string }

func (e errKubeletToken) Error() string { return "service account token rejected: " + e.reason }

// verify checks the token's signature against the issuer's keys, then iss,
// aud, exp, nbf and iat, and returns the service account it names.
func (k *KubeletAPI) verify(raw string) (kubeletIdentity, error) {
	tok, err := jwt.ParseSigned(raw, []jose.SignatureAlgorithm{jose.RS256, jose.ES256})
	if err != nil {
		return kubeletIdentity{}, errKubeletToken{"not a signed JWT (RS256 or ES256)"}
	}
	// Which issuer: read "iss" unverified only to pick the keys; the
	// signature is checked with those keys alone before anything is trusted.
	var unverified jwt.Claims
	if err := tok.UnsafeClaimsWithoutVerification(&unverified); err != nil {
		return kubeletIdentity{}, errKubeletToken{"unreadable claims"}
	}
	var is *kubeletIssuer
	for _, x := range k.issuers {
		if x.Issuer == unverified.Issuer {
			is = x
		}
	}
	if is == nil {
		return kubeletIdentity{}, errKubeletToken{"unknown issuer"}
	}
	if len(tok.Headers) != 1 {
		return kubeletIdentity{}, errKubeletToken{"want exactly one signature"}
	}
	candidates := is.keys.Keys
	if kid := tok.Headers[0].KeyID; kid != "" {
		if byID := is.keys.Key(kid); len(byID) > 0 {
			candidates = byID
		}
	}
	var claims kubeletSAClaims
	verified := false
	for _, key := range candidates {
		if err := tok.Claims(key.Key, &claims); err == nil {
			verified = true
			break
		}
	}
	if !verified {
		return kubeletIdentity{}, errKubeletToken{"signature does not verify with the issuer's keys"}
	}
	if claims.Expiry == nil {
		return kubeletIdentity{}, errKubeletToken{"no expiry (legacy secret-based tokens are refused; use tokenAttributes)"}
	}
	err = claims.ValidateWithLeeway(jwt.Expected{Issuer: is.Issuer, AnyAudience: jwt.Audience{is.Audience}, Time: k.now()}, k.leeway)
	switch {
	case errors.Is(err, jwt.ErrExpired):
		return kubeletIdentity{}, errKubeletToken{"expired"}
	case errors.Is(err, jwt.ErrNotValidYet), errors.Is(err, jwt.ErrIssuedInTheFuture):
		return kubeletIdentity{}, errKubeletToken{"not valid yet"}
	case errors.Is(err, jwt.ErrInvalidAudience):
		return kubeletIdentity{}, errKubeletToken{"audience is not " + is.Audience}
	case err != nil:
		return kubeletIdentity{}, errKubeletToken{"invalid claims"}
	}
	id := kubeletIdentity{issuer: is.Issuer}
	var fromSub kubeletIdentity
	if rest, ok := strings.CutPrefix(claims.Subject, "system:serviceaccount:"); ok {
		ns, name, ok := strings.Cut(rest, ":")
		if ok && ns != "" && name != "" && !strings.Contains(name, ":") {
			fromSub.namespace, fromSub.name = ns, name
		}
	}
	if kc := claims.Kubernetes; kc != nil && kc.ServiceAccount != nil {
		id.namespace, id.name = kc.Namespace, kc.ServiceAccount.Name
		if kc.Pod != nil {
			id.pod = kc.Pod.Name
		}
		if fromSub.namespace != "" && (fromSub.namespace != id.namespace || fromSub.name != id.name) {
			return kubeletIdentity{}, errKubeletToken{"sub and kubernetes.io claims name different service accounts"}
		}
	} else {
		id.namespace, id.name = fromSub.namespace, fromSub.name
	}
	if id.namespace == "" || id.name == "" {
		return kubeletIdentity{}, errKubeletToken{"not a service account token"}
	}
	return id, nil
}

// project is the project bound to a service account: an exact binding wins
// over a namespace-wide one.
func (k *KubeletAPI) project(id kubeletIdentity) (string, bool) {
	wild := ""
	for _, b := range k.bindings {
		if b.Issuer != id.issuer || b.Namespace != id.namespace {
			continue
		}
		if b.ServiceAccount == id.name {
			return b.Project, true
		}
		if b.ServiceAccount == "*" {
			wild = b.Project
		}
	}
	return wild, wild != ""
}

// ServeHTTP answers one plugin request.
func (k *KubeletAPI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	ev := KubeletAuditEvent{Time: k.now(), Client: r.RemoteAddr}
	defer func() {
		if k.audit != nil {
			k.audit(ev)
		}
	}()
	fail := func(status int, code, outcome, msg string) {
		ev.Outcome, ev.Reason, ev.Status = outcome, msg, status
		kubeletWriteError(w, status, code, msg)
	}
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		fail(http.StatusMethodNotAllowed, "UNSUPPORTED", "bad-request", "use POST")
		return
	}
	if ct := r.Header.Get("Content-Type"); ct != "" && !strings.HasPrefix(ct, "application/json") {
		fail(http.StatusUnsupportedMediaType, "UNSUPPORTED", "bad-request", "want application/json")
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, kubeletMaxBody+1))
	if err != nil {
		fail(http.StatusBadRequest, "UNSUPPORTED", "bad-request", "could not read the request")
		return
	}
	if len(body) > kubeletMaxBody {
		fail(http.StatusRequestEntityTooLarge, "SIZE_INVALID", "bad-request", "request too large")
		return
	}
	var req kubeletRequest
	dec := json.NewDecoder(strings.NewReader(string(body)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		fail(http.StatusBadRequest, "UNSUPPORTED", "bad-request", "invalid request body: want {image, service_account_token, service_account_annotations}")
		return
	}
	ev.Image = req.Image
	if req.ServiceAccountToken == "" {
		fail(http.StatusUnauthorized, "UNAUTHORIZED", "invalid-token", "a service account token is required")
		return
	}
	id, err := k.verify(req.ServiceAccountToken)
	if err != nil {
		fail(http.StatusUnauthorized, "UNAUTHORIZED", "invalid-token", err.Error())
		return
	}
	ev.Issuer, ev.Namespace, ev.ServiceAccount, ev.Pod = id.issuer, id.namespace, id.name, id.pod
	project, ok := k.project(id)
	if !ok {
		fail(http.StatusForbidden, "DENIED", "no-binding", fmt.Sprintf("service account %s/%s is bound to no project", id.namespace, id.name))
		return
	}
	ev.Project = project
	ref, err := name.ParseReference(strings.TrimSpace(req.Image))
	if err != nil {
		fail(http.StatusBadRequest, "NAME_INVALID", "bad-request", "invalid image reference")
		return
	}
	t, err := secret.ParseServerURL(ref.Context().RegistryStr())
	if err != nil {
		fail(http.StatusBadRequest, "NAME_INVALID", "bad-request", "invalid image registry")
		return
	}
	t.Repo = ref.Context().RepositoryStr()
	ctx := r.Context()

	if k.proxyHosts[t.Host] && k.tokens != nil {
		tok, exp, err := k.tokens.IssuePullToken(ctx, project, t.Repo, k.ttl)
		if err != nil {
			fail(http.StatusInternalServerError, "UNKNOWN", "error", "could not issue a pull token")
			return
		}
		ev.Outcome, ev.Registry, ev.Status = "pull-token", t.Host, http.StatusOK
		ev.TokenID, _ = ParseTokenID(tok)
		kubeletWriteJSON(w, kubeletResponse{Registry: t.Host, CacheKeyType: "Registry", Username: project, Password: tok, ExpiresAt: &exp})
		return
	}

	sec, c, err := k.resolver.Resolve(ctx, project, t)
	if errors.Is(err, secret.ErrNotFound) {
		fail(http.StatusNotFound, "NOT_FOUND", "no-match", fmt.Sprintf("no pull secret of the service account's project covers %s", t))
		return
	}
	if err != nil {
		ev.Secret = sec.Name
		// Store and provider errors name secrets and registries, never values.
		fail(http.StatusBadGateway, "UNKNOWN", "error", "resolving the pull secret failed: "+err.Error())
		return
	}
	key, kt := string(t.Host), "Registry"
	best := 0
	for _, p := range sec.Registries {
		if sc := p.Match(t); sc > best {
			best, key = sc, string(p)
			if p.Prefix() == "" {
				kt = "Registry"
			} else {
				kt = "Image"
			}
		}
	}
	resp := kubeletResponse{Registry: key, CacheKeyType: kt, Username: c.Username, Password: c.Password, IdentityToken: c.IdentityToken}
	if !c.Expires.IsZero() {
		exp := c.Expires.UTC()
		resp.ExpiresAt = &exp
	}
	ev.Outcome, ev.Registry, ev.Secret, ev.Status = "credential", key, sec.Name, http.StatusOK
	kubeletWriteJSON(w, resp)
}

func kubeletWriteJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	_ = json.NewEncoder(w).Encode(v)
}

func kubeletWriteError(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]any{"errors": []map[string]string{{"code": code, "message": msg}}})
}
