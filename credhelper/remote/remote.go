// Package remote is the credential helpers' remote mode: with
// PULLSECRET_SERVER set, the helper asks a pullsecret server's credential
// API instead of a local store. It holds only a
// project token (PULLSECRET_TOKEN or PULLSECRET_TOKEN_FILE); the server
// answers the project's pull secret for the registry asked for (the token
// needs the credentials scope), or, for the proxy's own host, the project
// token itself as an identity token.
//
// It is a package of its own so that the local helper, which starts once
// per pull, links no net/http.
package remote

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
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/docker/docker-credential-helpers/credentials"
	"github.com/pullsecret/pullsecret/internal/httpclient"
	"github.com/pullsecret/pullsecret/secret"
)

// Environment of the remote mode.
const (
	// EnvServer is the server's base URL, e.g. https://pullsecret.internal:5000
	// (https:// is assumed when no scheme is given). Setting it selects
	// remote mode.
	EnvServer = "PULLSECRET_SERVER"
	// EnvToken is the project token.
	EnvToken = "PULLSECRET_TOKEN"
	// EnvTokenFile names a file holding the project token, read when
	// EnvToken is not set.
	EnvTokenFile = "PULLSECRET_TOKEN_FILE"
	// EnvCAFile names a PEM file of CA certificates to trust for the
	// server, besides the system's.
	EnvCAFile = "PULLSECRET_CA_FILE"
)

// CredentialsAPIPath is the server's credential API.
const CredentialsAPIPath = "/api/v1/credentials"

// Remote mode bounds: callers of a helper set no timeout, so every call is
// bounded here, and a server that is down fails fast.
const (
	DefaultRemoteTimeout = 10 * time.Second
	remoteDialTimeout    = 3 * time.Second
	maxRemoteBody        = 1 << 20
	maxTokenSize         = 4096
)

// Helper is a credentials.Helper that asks a pullsecret server.
type Helper struct {
	server   string // base URL, for messages: no user info, no query
	endpoint string
	token    string
	client   *http.Client
	timeout  time.Duration
}

var _ credentials.Helper = (*Helper)(nil)

type remoteConfig struct {
	timeout time.Duration
	caFile  string
	client  *http.Client
}

// Option configures New.
type Option func(*remoteConfig)

// WithTimeout bounds each call (default DefaultRemoteTimeout).
func WithTimeout(d time.Duration) Option {
	return func(c *remoteConfig) {
		if d > 0 {
			c.timeout = d
		}
	}
}

// WithCAFile trusts the PEM CA certificates in path for the server,
// besides the system's.
func WithCAFile(path string) Option {
	return func(c *remoteConfig) { c.caFile = path }
}

// WithHTTPClient sends requests with client (its Timeout and
// CheckRedirect are kept; the call is still bounded by the timeout).
func WithHTTPClient(client *http.Client) Option {
	return func(c *remoteConfig) { c.client = client }
}

// Configured reports whether the environment selects remote mode.
func Configured(getenv func(string) string) bool {
	return strings.TrimSpace(getenv(EnvServer)) != ""
}

// FromEnv builds the remote helper from PULLSECRET_SERVER,
// PULLSECRET_TOKEN (else PULLSECRET_TOKEN_FILE) and PULLSECRET_CA_FILE.
// Errors never quote the token.
func FromEnv(getenv func(string) string, opts ...Option) (*Helper, error) {
	tok := getenv(EnvToken)
	if tok == "" {
		file := getenv(EnvTokenFile)
		if file == "" {
			return nil, fmt.Errorf("%s is set but neither %s nor %s is", EnvServer, EnvToken, EnvTokenFile)
		}
		b, err := readTokenFile(file)
		if err != nil {
			return nil, err
		}
		tok = b
	}
	if ca := getenv(EnvCAFile); ca != "" {
		opts = append([]Option{WithCAFile(ca)}, opts...)
	}
	return New(getenv(EnvServer), tok, opts...)
}

func readTokenFile(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("%s: %w", EnvTokenFile, errors.Unwrap(err))
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxTokenSize+1))
	if err != nil {
		return "", fmt.Errorf("%s: read %s: %v", EnvTokenFile, path, err)
	}
	if len(b) > maxTokenSize {
		return "", fmt.Errorf("%s: %s is larger than a token", EnvTokenFile, path)
	}
	return strings.TrimSpace(string(b)), nil
}

// New returns a helper asking the server at server (a base URL) with
// the project token tok.
func New(server, tok string, opts ...Option) (*Helper, error) {
	cfg := remoteConfig{timeout: DefaultRemoteTimeout}
	for _, o := range opts {
		o(&cfg)
	}
	base, err := parseServer(server)
	if err != nil {
		return nil, err
	}
	tok = strings.TrimSpace(tok)
	if tok == "" {
		return nil, errors.New("the project token is empty")
	}
	if len(tok) > maxTokenSize || strings.ContainsFunc(tok, func(r rune) bool { return r <= 0x20 || r == 0x7f }) {
		return nil, errors.New("the project token is malformed (spaces or control characters)")
	}
	client := cfg.client
	if client == nil {
		var err error
		if client, err = httpclient.ToServer(remoteDialTimeout, cfg.timeout, cfg.caFile); err != nil {
			return nil, fmt.Errorf("%s: %w", EnvCAFile, err)
		}
	}
	return &Helper{
		server:   base.String(),
		endpoint: base.String() + CredentialsAPIPath,
		token:    tok,
		client:   client,
		timeout:  cfg.timeout,
	}, nil
}

// parseServer checks the server URL: http(s), a host, an optional path
// prefix; https:// when no scheme is given.
func parseServer(s string) (*url.URL, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return nil, fmt.Errorf("%s is empty", EnvServer)
	}
	if !strings.Contains(s, "://") {
		s = "https://" + s
	}
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("%s: want http(s)://HOST[:PORT]", EnvServer)
	}
	if u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		return nil, fmt.Errorf("%s: no user info, query or fragment in the server URL", EnvServer)
	}
	u.Path = strings.TrimRight(u.Path, "/")
	u.RawPath = ""
	return u, nil
}

// remoteRequest and remoteResponse are the credential API's body and
// answer.
type remoteRequest struct {
	Registry   string `json:"registry"`
	Repository string `json:"repository,omitempty"`
}

type remoteResponse struct {
	Username string `json:"username"`
	Secret   string `json:"secret"`
}

// remoteTarget normalises what the caller sent. A repository path the local
// grammar refuses (some callers send host/anything) is dropped: the host
// alone is asked for.
func remoteTarget(serverURL string) (secret.Target, error) {
	t, err := secret.ParseServerURL(serverURL)
	if err == nil {
		return t, nil
	}
	s := strings.TrimSpace(serverURL)
	if i := strings.Index(s, "://"); i >= 0 {
		s = s[i+3:]
	}
	if host, _, ok := strings.Cut(s, "/"); ok {
		if t, err2 := secret.ParseServerURL(host); err2 == nil {
			return t, nil
		}
	}
	return secret.Target{}, err
}

// Get asks the server for the credential of serverURL.
func (r *Helper) Get(serverURL string) (string, string, error) {
	t, err := remoteTarget(serverURL)
	if err != nil {
		return "", "", fmt.Errorf("pullsecret: %w", err)
	}
	body, _ := json.Marshal(remoteRequest{Registry: t.Host, Repository: t.Repo})
	ctx, cancel := context.WithTimeout(context.Background(), r.timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, r.endpoint, bytes.NewReader(body))
	if err != nil {
		return "", "", fmt.Errorf("pullsecret: server %s: %v", r.server, err)
	}
	req.Header.Set("Authorization", "Bearer "+r.token)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")
	req.Header.Set("User-Agent", "docker-credential-pullsecret")
	resp, err := r.client.Do(req)
	if err != nil {
		return "", "", r.unreachable(err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxRemoteBody))
	if err != nil {
		return "", "", r.unreachable(err)
	}
	switch resp.StatusCode {
	case http.StatusOK:
		var out remoteResponse
		if err := json.Unmarshal(data, &out); err != nil || out.Username == "" || out.Secret == "" {
			return "", "", fmt.Errorf("pullsecret: server %s: invalid credential response", r.server)
		}
		return out.Username, out.Secret, nil
	case http.StatusNotFound:
		// Only the API's own answer means "no pull secret": a 404 from
		// something else (a wrong PULLSECRET_SERVER) must not make the
		// client silently go anonymous.
		if remoteCode(data) == "NOT_FOUND" {
			return "", "", credentials.NewErrCredentialsNotFound()
		}
		return "", "", fmt.Errorf("pullsecret: server %s has no credential API at %s (HTTP 404); is %s the pullsecret server's URL?", r.server, CredentialsAPIPath, EnvServer)
	case http.StatusUnauthorized:
		return "", "", fmt.Errorf("pullsecret: server %s refused the project token%s; check %s or %s", r.server, remoteReason(data), EnvToken, EnvTokenFile)
	case http.StatusForbidden:
		return "", "", fmt.Errorf("pullsecret: server %s denied the request%s", r.server, remoteReason(data))
	case http.StatusTooManyRequests:
		return "", "", fmt.Errorf("pullsecret: server %s: too many failed logins, retry after %s s", r.server, remoteSanitize(resp.Header.Get("Retry-After"), 10))
	}
	return "", "", fmt.Errorf("pullsecret: server %s answered %d %s%s", r.server, resp.StatusCode, http.StatusText(resp.StatusCode), remoteReason(data))
}

// unreachable explains a transport failure in a few words.
func (r *Helper) unreachable(err error) error {
	var reason string
	var dnsErr *net.DNSError
	var ne net.Error
	switch {
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		reason = fmt.Sprintf("no answer within %s", r.timeout)
	case errors.Is(err, syscall.ECONNREFUSED):
		reason = "connection refused"
	case errors.Is(err, syscall.ECONNRESET):
		reason = "connection reset"
	case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH):
		reason = "no route to host"
	case errors.As(err, &dnsErr):
		reason = "unknown host " + remoteSanitize(dnsErr.Name, 253)
	default:
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		reason = remoteSanitize(err.Error(), 300)
	}
	return fmt.Errorf("pullsecret: server %s unreachable: %s", r.server, reason)
}

// remoteReason is the message of a registry-style JSON error body, as
// " (CODE: message)".
func remoteReason(body []byte) string {
	var e struct {
		Errors []struct {
			Code    string `json:"code"`
			Message string `json:"message"`
		} `json:"errors"`
	}
	if json.Unmarshal(body, &e) != nil || len(e.Errors) == 0 {
		return ""
	}
	return " (" + remoteSanitize(e.Errors[0].Message, 300) + ")"
}

// remoteCode is the code of a registry-style JSON error body.
func remoteCode(body []byte) string {
	var e struct {
		Errors []struct {
			Code string `json:"code"`
		} `json:"errors"`
	}
	if json.Unmarshal(body, &e) != nil || len(e.Errors) == 0 {
		return ""
	}
	return e.Errors[0].Code
}

// remoteSanitize keeps text from a server printable and short.
func remoteSanitize(s string, n int) string {
	s = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, s)
	if len(s) > n {
		s = s[:n] + "..."
	}
	return s
}

var errRemoteReadOnly = fmt.Errorf("not supported in remote mode (%s is set): pull secrets are managed on the server with 'pullsecret secret'", EnvServer)

// Add is not supported: the server holds the pull secrets.
func (r *Helper) Add(*credentials.Credentials) error {
	return fmt.Errorf("pullsecret: store is %w", errRemoteReadOnly)
}

// Delete is not supported: the server holds the pull secrets.
func (r *Helper) Delete(string) error {
	return fmt.Errorf("pullsecret: erase is %w", errRemoteReadOnly)
}

// List answers nothing: the server does not list credentials.
func (r *Helper) List() (map[string]string, error) { return map[string]string{}, nil }

// Server is the server's base URL.
func (r *Helper) Server() string { return r.server }
