// Package kubelet is the kubelet image credential provider protocol,
// credentialprovider.kubelet.k8s.io/v1: kubelet runs the plugin with a
// CredentialProviderRequest on stdin and reads a CredentialProviderResponse
// from stdout. It gives the plugin one minute and decodes strictly.
//
// It lives apart from credhelper so that the docker credential helper,
// which starts on every pull, links none of its HTTP client.
package kubelet

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"path"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/pullsecret/pullsecret/credhelper"
	"github.com/pullsecret/pullsecret/internal/httpclient"
	"github.com/pullsecret/pullsecret/secret"
)

// Protocol constants.
const (
	ProviderAPIVersion = "credentialprovider.kubelet.k8s.io/v1"
	RequestKind        = "CredentialProviderRequest"
	ResponseKind       = "CredentialProviderResponse"
)

// Cache key types of a response: how widely kubelet reuses it.
const (
	CacheKeyImage    = "Image"
	CacheKeyRegistry = "Registry"
	CacheKeyGlobal   = "Global"
)

// Defaults of the plugin.
const (
	// DefaultProviderCacheDuration is how long kubelet may keep a credential
	// that does not expire.
	DefaultProviderCacheDuration = 5 * time.Minute
	// DefaultProviderTimeout bounds one plugin run, well under kubelet's
	// one minute.
	DefaultProviderTimeout = 10 * time.Second
	// maxRequest bounds what is read from stdin.
	maxRequest = 1 << 20
)

// KubeletAPIPath is the server's endpoint for the plugin's
// service-account-token mode.
const KubeletAPIPath = "/api/v1/kubelet/credentials"

// ErrNoCredential means no pull secret applies: the plugin answers with an
// empty auth, which is not an error for kubelet.
var ErrNoCredential = errors.New("no credential for this image")

// ProviderRequest is kubelet's CredentialProviderRequest.
type ProviderRequest struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Image      string `json:"image"`
	// ServiceAccountToken is the pod's projected service account token
	// (KEP-4412), present when the provider's config has tokenAttributes.
	ServiceAccountToken       string            `json:"serviceAccountToken,omitempty"`
	ServiceAccountAnnotations map[string]string `json:"serviceAccountAnnotations,omitempty"`
}

// String never prints the token.
func (r ProviderRequest) String() string {
	return fmt.Sprintf("CredentialProviderRequest{image=%q, token=%t, annotations=%d}", r.Image, r.ServiceAccountToken != "", len(r.ServiceAccountAnnotations))
}

// GoString keeps %#v from printing the token.
func (r ProviderRequest) GoString() string { return r.String() }

// ProviderResponse is kubelet's CredentialProviderResponse.
type ProviderResponse struct {
	APIVersion   string `json:"apiVersion"`
	Kind         string `json:"kind"`
	CacheKeyType string `json:"cacheKeyType"`
	// CacheDuration is a Go duration ("4m30s"); "0s" means do not cache.
	CacheDuration string                `json:"cacheDuration,omitempty"`
	Auth          map[string]AuthConfig `json:"auth,omitempty"`
}

// AuthConfig is one credential of a response.
type AuthConfig struct {
	Username string `json:"username"`
	Password string `json:"password"`
}

// String never prints the password.
func (a AuthConfig) String() string {
	return fmt.Sprintf("AuthConfig{username=%q, password=REDACTED}", a.Username)
}

// GoString keeps %#v from printing the password.
func (a AuthConfig) GoString() string { return a.String() }

// DecodeProviderRequest reads one request strictly, as kubelet's own
// decoder would: unknown fields, trailing data, a wrong apiVersion or kind
// and an empty image are errors.
func DecodeProviderRequest(r io.Reader) (*ProviderRequest, error) {
	data, err := io.ReadAll(io.LimitReader(r, maxRequest+1))
	if err != nil {
		return nil, fmt.Errorf("read request: %w", err)
	}
	if len(data) > maxRequest {
		return nil, fmt.Errorf("request is larger than %d bytes", maxRequest)
	}
	if err := strictKeys(data, requestFields, "serviceAccountAnnotations"); err != nil {
		return nil, fmt.Errorf("decode %s: %w", RequestKind, err)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var req ProviderRequest
	if err := dec.Decode(&req); err != nil {
		return nil, fmt.Errorf("decode %s: %w", RequestKind, redactJSONError(err))
	}
	if len(bytes.TrimSpace(data[dec.InputOffset():])) > 0 {
		return nil, fmt.Errorf("decode %s: unexpected data after the request", RequestKind)
	}
	if req.APIVersion != ProviderAPIVersion {
		return nil, fmt.Errorf("%s: apiVersion %q, this plugin speaks %s", RequestKind, req.APIVersion, ProviderAPIVersion)
	}
	if req.Kind != RequestKind {
		return nil, fmt.Errorf("kind %q: want %s", req.Kind, RequestKind)
	}
	if strings.TrimSpace(req.Image) == "" {
		return nil, fmt.Errorf("%s: image is empty", RequestKind)
	}
	return &req, nil
}

var requestFields = []string{"apiVersion", "kind", "image", "serviceAccountToken", "serviceAccountAnnotations"}

// strictKeys checks what encoding/json lets through and kubelet's strict
// decoder does not: a top-level key that matches a field only when case is
// ignored, and a key given twice (at the top level, or in the object-valued
// field mapField).
func strictKeys(data []byte, fields []string, mapField string) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	tok, err := dec.Token()
	if err != nil {
		return redactJSONError(err)
	}
	if tok != json.Delim('{') {
		return errors.New("want a JSON object")
	}
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return redactJSONError(err)
		}
		key, _ := tok.(string)
		if seen[key] {
			return fmt.Errorf("duplicate field %q", key)
		}
		seen[key] = true
		known := false
		for _, f := range fields {
			if f == key {
				known = true
			} else if strings.EqualFold(f, key) {
				return fmt.Errorf("unknown field %q (did you mean %q? field names are case-sensitive)", key, f)
			}
		}
		if !known {
			return fmt.Errorf("unknown field %q", key)
		}
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return redactJSONError(err)
		}
		if key == mapField {
			if err := uniqueKeys(raw); err != nil {
				return fmt.Errorf("%s: %w", key, err)
			}
		}
	}
	return nil
}

// uniqueKeys checks that a JSON object (or null) has no key twice.
func uniqueKeys(raw json.RawMessage) error {
	dec := json.NewDecoder(bytes.NewReader(raw))
	tok, err := dec.Token()
	if err != nil || tok != json.Delim('{') {
		return nil // null or a wrong type: the struct decoder reports it
	}
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return redactJSONError(err)
		}
		key, _ := tok.(string)
		if seen[key] {
			return fmt.Errorf("duplicate key %q", key)
		}
		seen[key] = true
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			return redactJSONError(err)
		}
	}
	return nil
}

// redactJSONError keeps the decoder's message (which names fields and
// offsets) but never quotes values.
func redactJSONError(err error) error {
	var se *json.SyntaxError
	if errors.As(err, &se) {
		return fmt.Errorf("invalid JSON at offset %d", se.Offset)
	}
	var ue *json.UnmarshalTypeError
	if errors.As(err, &ue) {
		return fmt.Errorf("field %s: wrong type (%s)", ue.Field, ue.Value)
	}
	return err
}

// ProviderCredential is what a source found for an image.
type ProviderCredential struct {
	// Key is the auth map key: a kubelet matchImages-style pattern
	// ("ghcr.io/acme", "127.0.0.1:5000") that covers the image.
	Key        string
	Credential secret.Credential
	// CacheKeyType is CacheKeyRegistry when the credential covers the whole
	// registry host, CacheKeyImage when it covers only part of it.
	CacheKeyType string
}

// ProviderSource resolves an image to a credential, or returns
// ErrNoCredential.
type ProviderSource interface {
	ProviderCredential(ctx context.Context, req *ProviderRequest) (*ProviderCredential, error)
}

// Provider answers kubelet's requests from a source.
type Provider struct {
	Source ProviderSource
	// DefaultCacheDuration is the cache duration of a credential that does
	// not expire (default DefaultProviderCacheDuration).
	DefaultCacheDuration time.Duration
	// Timeout bounds one request (default DefaultProviderTimeout).
	Timeout time.Duration
	Now     func() time.Time
}

// Serve reads one request from in and writes the response to out. An
// image no pull secret covers gets an empty auth, not an error.
func (p *Provider) Serve(ctx context.Context, in io.Reader, out io.Writer) error {
	req, err := DecodeProviderRequest(in)
	if err != nil {
		return err
	}
	resp, err := p.Respond(ctx, req)
	if err != nil {
		return err
	}
	b, err := json.Marshal(resp)
	if err != nil {
		return err
	}
	_, err = out.Write(append(b, '\n'))
	return err
}

// Respond answers one request.
func (p *Provider) Respond(ctx context.Context, req *ProviderRequest) (*ProviderResponse, error) {
	timeout := p.Timeout
	if timeout <= 0 {
		timeout = DefaultProviderTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	c, err := p.Source.ProviderCredential(ctx, req)
	if errors.Is(err, ErrNoCredential) {
		return EmptyResponse(), nil
	}
	if err != nil {
		return nil, err
	}
	return p.response(c)
}

// EmptyResponse is the answer for an image no pull secret covers: no auth,
// and not cached, so that a secret added later is used at the next pull.
func EmptyResponse() *ProviderResponse {
	return &ProviderResponse{APIVersion: ProviderAPIVersion, Kind: ResponseKind, CacheKeyType: CacheKeyImage, CacheDuration: "0s"}
}

func (p *Provider) response(c *ProviderCredential) (*ProviderResponse, error) {
	now := time.Now
	if p.Now != nil {
		now = p.Now
	}
	d := p.DefaultCacheDuration
	if d <= 0 {
		d = DefaultProviderCacheDuration
	}
	if !c.Credential.Expires.IsZero() {
		left := c.Credential.Expires.Sub(now())
		if left <= 0 {
			return nil, fmt.Errorf("the credential for %s has expired", c.Key)
		}
		d = min(d, left/2)
	}
	d = d.Truncate(time.Second)
	user, pass := c.Credential.Username, c.Credential.Password
	if c.Credential.IdentityToken != "" {
		// Kubelet's AuthConfig has no identity token; the convention of the
		// docker-credential-helpers protocol is the closest it can carry.
		user, pass = credhelper.TokenUsername, c.Credential.IdentityToken
	}
	kt := c.CacheKeyType
	if kt != CacheKeyRegistry && kt != CacheKeyGlobal {
		kt = CacheKeyImage
	}
	return &ProviderResponse{
		APIVersion:    ProviderAPIVersion,
		Kind:          ResponseKind,
		CacheKeyType:  kt,
		CacheDuration: d.String(),
		Auth:          map[string]AuthConfig{c.Key: {Username: user, Password: pass}},
	}, nil
}

// ImageTarget is the registry host (canonical, as pull secrets match it)
// and repository of an image reference.
func ImageTarget(image string) (secret.Target, error) {
	ref, err := name.ParseReference(strings.TrimSpace(image))
	if err != nil {
		return secret.Target{}, fmt.Errorf("image %q: %w", image, err)
	}
	t, err := secret.ParseServerURL(ref.Context().RegistryStr())
	if err != nil {
		return secret.Target{}, err
	}
	t.Repo = ref.Context().RepositoryStr()
	return t, nil
}

// keyFor is the auth key and cache key type for a credential from sec
// covering t: the most specific of sec's patterns that covers t.
func keyFor(sec secret.Secret, t secret.Target) (string, string) {
	best, score := secret.Pattern(t.Host), 0
	for _, p := range sec.Registries {
		if sc := p.Match(t); sc > score {
			best, score = p, sc
		}
	}
	if best.Prefix() == "" {
		return string(best), CacheKeyRegistry
	}
	return string(best), CacheKeyImage
}

// LocalProviderSource resolves images from the local sealed store for one
// project. It ignores the service account: every pod on the node whose
// image matches gets the project's credential, so use it only on nodes that
// run one project; the server mode isolates projects per service account.
type LocalProviderSource struct {
	Store   *secret.Store
	Project string
}

// ProviderCredential resolves the image's pull secret now.
func (l *LocalProviderSource) ProviderCredential(ctx context.Context, req *ProviderRequest) (*ProviderCredential, error) {
	t, err := ImageTarget(req.Image)
	if err != nil {
		return nil, err
	}
	sec, c, err := l.Store.Resolve(ctx, l.Project, t)
	if errors.Is(err, secret.ErrNotFound) {
		return nil, ErrNoCredential
	}
	if err != nil {
		return nil, err
	}
	key, kt := keyFor(sec, t)
	return &ProviderCredential{Key: key, Credential: c, CacheKeyType: kt}, nil
}

// KubeletCredentialRequest is the body of POST /api/v1/kubelet/credentials.
type KubeletCredentialRequest struct {
	Image                     string            `json:"image"`
	ServiceAccountToken       string            `json:"service_account_token"`
	ServiceAccountAnnotations map[string]string `json:"service_account_annotations,omitempty"`
}

// KubeletCredentialResponse is the server's answer: one credential and the
// pattern it covers.
type KubeletCredentialResponse struct {
	Registry      string     `json:"registry"` // auth key, e.g. "ghcr.io/acme"
	CacheKeyType  string     `json:"cache_key_type,omitempty"`
	Username      string     `json:"username,omitempty"`
	Password      string     `json:"password,omitempty"`
	IdentityToken string     `json:"identity_token,omitempty"`
	ExpiresAt     *time.Time `json:"expires_at,omitempty"`
}

// RemoteProviderSource sends the pod's service account token to a
// pullsecret server, which maps it to a project and answers with that
// project's credential for the image (or a proxy pull token when the image
// is on the proxy).
type RemoteProviderSource struct {
	Server string // base URL, e.g. https://pullsecret.internal:5000
	Client *http.Client
}

// NewRemoteProviderSource returns a source for server with a client bounded
// by timeout, trusting caFile (PEM) in addition to the system roots when it
// is set.
func NewRemoteProviderSource(server, caFile string, timeout time.Duration) (*RemoteProviderSource, error) {
	u, err := url.Parse(server)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("server %q: want an http:// or https:// URL", server)
	}
	if u.User != nil {
		return nil, fmt.Errorf("server URL must not contain user info")
	}
	if timeout <= 0 {
		timeout = DefaultProviderTimeout
	}
	client, err := httpclient.ToServer(timeout/2, timeout, caFile)
	if err != nil {
		return nil, fmt.Errorf("CA file: %w", err)
	}
	return &RemoteProviderSource{
		Server: strings.TrimRight(u.String(), "/"),
		Client: client,
	}, nil
}

// ProviderCredential asks the server.
func (r *RemoteProviderSource) ProviderCredential(ctx context.Context, req *ProviderRequest) (*ProviderCredential, error) {
	if req.ServiceAccountToken == "" {
		// No service account, no project: the server could only refuse.
		return nil, ErrNoCredential
	}
	body, err := json.Marshal(KubeletCredentialRequest{
		Image:                     req.Image,
		ServiceAccountToken:       req.ServiceAccountToken,
		ServiceAccountAnnotations: req.ServiceAccountAnnotations,
	})
	if err != nil {
		return nil, err
	}
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, r.Server+KubeletAPIPath, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	hreq.Header.Set("Content-Type", "application/json")
	hreq.Header.Set("Accept", "application/json")
	client := r.Client
	if client == nil {
		client = &http.Client{Timeout: DefaultProviderTimeout}
	}
	resp, err := client.Do(hreq)
	if err != nil {
		return nil, fmt.Errorf("pullsecret server %s: %w", r.Server, redactURLError(err))
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, fmt.Errorf("pullsecret server %s: %w", r.Server, err)
	}
	switch resp.StatusCode {
	case http.StatusOK:
	case http.StatusNotFound, http.StatusForbidden:
		// No binding for this service account, or no pull secret of its
		// project covers the image.
		return nil, ErrNoCredential
	default:
		return nil, fmt.Errorf("pullsecret server %s: %s%s", r.Server, resp.Status, serverReason(data))
	}
	var kr KubeletCredentialResponse
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&kr); err != nil {
		return nil, fmt.Errorf("pullsecret server %s: invalid response: %w", r.Server, redactJSONError(err))
	}
	if kr.Registry == "" {
		return nil, fmt.Errorf("pullsecret server %s: response names no registry", r.Server)
	}
	c := secret.Credential{Username: kr.Username, Password: kr.Password, IdentityToken: kr.IdentityToken}
	if kr.ExpiresAt != nil {
		c.Expires = *kr.ExpiresAt
	}
	return &ProviderCredential{Key: kr.Registry, Credential: c, CacheKeyType: kr.CacheKeyType}, nil
}

// serverReason is the message of a registry-style JSON error, if the body
// is one.
func serverReason(body []byte) string {
	var e struct {
		Errors []struct {
			Code    string `json:"code"`
			Message string `json:"message"`
		} `json:"errors"`
	}
	if json.Unmarshal(body, &e) != nil || len(e.Errors) == 0 {
		return ""
	}
	var parts []string
	for _, x := range e.Errors {
		parts = append(parts, strings.TrimSpace(x.Code+": "+x.Message))
	}
	return " (" + strings.Join(parts, "; ") + ")"
}

// redactURLError drops the URL from a transport error (it is the server's,
// already named) and keeps the cause.
func redactURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		if errors.Is(ue.Err, context.DeadlineExceeded) {
			return errors.New("no answer in time")
		}
		return ue.Err
	}
	return err
}

// MatchImage reports whether image matches a kubelet matchImages pattern,
// with kubelet's rules: the same number of dot-separated host parts, each
// part glob-matched (path.Match), the port equal, and the pattern's path a
// plain string prefix of the image's path. Schemes are not allowed on
// either side.
func MatchImage(pattern, image string) (bool, error) {
	pu, err := parseSchemeless(pattern)
	if err != nil {
		return false, fmt.Errorf("pattern %q: %w", pattern, err)
	}
	iu, err := parseSchemeless(image)
	if err != nil {
		return false, fmt.Errorf("image %q: %w", image, err)
	}
	pParts, pPort := splitURLHost(pu)
	iParts, iPort := splitURLHost(iu)
	if pPort != iPort || len(pParts) != len(iParts) {
		return false, nil
	}
	if !strings.HasPrefix(iu.Path, pu.Path) {
		return false, nil
	}
	for i, p := range pParts {
		ok, err := path.Match(p, iParts[i])
		if err != nil {
			return false, fmt.Errorf("pattern %q: %w", pattern, err)
		}
		if !ok {
			return false, nil
		}
	}
	return true, nil
}

// ValidMatchImage checks a matchImages entry the way kubelet validates its
// config: no scheme, a parseable host, a valid glob in each part.
func ValidMatchImage(pattern string) error {
	if strings.Contains(pattern, "://") {
		return fmt.Errorf("match image %q: no scheme allowed", pattern)
	}
	u, err := parseSchemeless(pattern)
	if err != nil {
		return fmt.Errorf("match image %q: %w", pattern, err)
	}
	if u.RawQuery != "" || u.Fragment != "" || strings.ContainsAny(pattern, "?#") || u.User != nil {
		return fmt.Errorf("match image %q: '?', '#' and '@' cannot be used (kubelet parses patterns as URLs)", pattern)
	}
	parts, _ := splitURLHost(u)
	for _, p := range parts {
		if p == "" {
			return fmt.Errorf("match image %q: empty host part", pattern)
		}
		if _, err := path.Match(p, ""); err != nil {
			return fmt.Errorf("match image %q: %w", pattern, err)
		}
	}
	return nil
}

func parseSchemeless(s string) (*url.URL, error) {
	u, err := url.Parse("https://" + s)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			return nil, ue.Err
		}
		return nil, err
	}
	u.Scheme = ""
	return u, nil
}

func splitURLHost(u *url.URL) ([]string, string) {
	host, port, err := net.SplitHostPort(u.Host)
	if err != nil {
		host, port = u.Host, ""
	}
	return strings.Split(host, "."), port
}
