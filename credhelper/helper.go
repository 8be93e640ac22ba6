// Package credhelper answers the docker-credential-helpers protocol (and,
// in provider.go, kubelet's credential provider protocol) from pull secrets:
// from the local sealed store, or from a pullsecret server.
package credhelper

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/docker/docker-credential-helpers/credentials"
	"github.com/pullsecret/pullsecret/secret"
)

// TokenUsername is the username that marks a secret as an identity token.
const TokenUsername = "<token>"

// DefaultTimeout bounds one helper call: callers set none, so the helper
// must bound its own work.
const DefaultTimeout = 20 * time.Second

// Local is a credentials.Helper backed by the local sealed store.
type Local struct {
	store   *secret.Store
	project string
	timeout time.Duration
}

var _ credentials.Helper = (*Local)(nil)

// LocalOption configures a Local helper.
type LocalOption func(*Local)

// WithProject selects the project (default "default").
func WithProject(p string) LocalOption {
	return func(l *Local) {
		if p != "" {
			l.project = p
		}
	}
}

// WithTimeout bounds each call.
func WithTimeout(d time.Duration) LocalOption { return func(l *Local) { l.timeout = d } }

// NewLocal returns a helper over store.
func NewLocal(store *secret.Store, opts ...LocalOption) *Local {
	l := &Local{store: store, project: secret.DefaultProject, timeout: DefaultTimeout}
	for _, o := range opts {
		o(l)
	}
	return l
}

func (l *Local) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), l.timeout)
}

// Get resolves the pull secret for serverURL now.
func (l *Local) Get(serverURL string) (string, string, error) {
	t, err := secret.ParseServerURL(serverURL)
	if err != nil {
		return "", "", fmt.Errorf("pullsecret: %w", err)
	}
	ctx, cancel := l.ctx()
	defer cancel()
	_, c, err := l.store.Resolve(ctx, l.project, t)
	if errors.Is(err, secret.ErrNotFound) {
		return "", "", credentials.NewErrCredentialsNotFound()
	}
	if err != nil {
		return "", "", fmt.Errorf("pullsecret: %w", err)
	}
	return userSecret(c)
}

func userSecret(c secret.Credential) (string, string, error) {
	if c.IdentityToken != "" {
		return TokenUsername, c.IdentityToken, nil
	}
	return c.Username, c.Password, nil
}

// Add stores what `docker login` hands over (credsStore: pullsecret). A
// secret that already claims this exact registry gets the new value;
// otherwise a secret named after the host is created.
func (l *Local) Add(c *credentials.Credentials) error {
	t, err := secret.ParseServerURL(c.ServerURL)
	if err != nil {
		return fmt.Errorf("pullsecret: %w", err)
	}
	p := secret.Pattern(t.String())
	sec := secret.Secret{Project: l.project, Kind: secret.Basic, Registries: []secret.Pattern{p}}
	v := secret.Value{Username: c.Username, Password: c.Secret}
	if c.Username == TokenUsername {
		sec.Kind, v = secret.Token, secret.Value{IdentityToken: c.Secret}
	}
	ctx, cancel := l.ctx()
	defer cancel()
	list, err := l.store.List(ctx, l.project)
	if err != nil {
		return fmt.Errorf("pullsecret: %w", err)
	}
	sec.Name = NameFor(p)
	for _, s := range list {
		for _, q := range s.Registries {
			if q != p {
				continue
			}
			if s.Kind == secret.ECR {
				// An ECR secret is exchanged for a fresh token at every
				// pull: a `docker login` with a token it handed out must
				// not replace it (the reference ECR helper ignores store
				// too).
				return nil
			}
			sec.Name, sec.Registries = s.Name, s.Registries
		}
	}
	if _, err := l.store.Put(ctx, sec, v); err != nil {
		return fmt.Errorf("pullsecret: %w", err)
	}
	return nil
}

// Delete forgets serverURL (`docker logout`).
func (l *Local) Delete(serverURL string) error {
	t, err := secret.ParseServerURL(serverURL)
	if err != nil {
		return fmt.Errorf("pullsecret: %w", err)
	}
	ctx, cancel := l.ctx()
	defer cancel()
	_, err = l.store.RemoveRegistry(ctx, l.project, secret.Pattern(t.String()))
	if errors.Is(err, secret.ErrNotFound) {
		return credentials.NewErrCredentialsNotFound()
	}
	if err != nil {
		return fmt.Errorf("pullsecret: %w", err)
	}
	return nil
}

// List maps every registry of the project's secrets to its username.
func (l *Local) List() (map[string]string, error) {
	ctx, cancel := l.ctx()
	defer cancel()
	list, err := l.store.List(ctx, l.project)
	if err != nil {
		return nil, fmt.Errorf("pullsecret: %w", err)
	}
	out := map[string]string{}
	for _, s := range list {
		user := TokenUsername
		if s.Kind == secret.ECR {
			user = "AWS"
		} else if s.Kind != secret.Token {
			_, v, err := l.store.Value(ctx, s.Project, s.Name)
			if err != nil {
				return nil, fmt.Errorf("pullsecret: %w", err)
			}
			user = v.Username
		}
		for _, p := range s.Registries {
			out[string(p)] = user
		}
	}
	return out, nil
}

// NameFor derives a secret name from a registry pattern:
// "127.0.0.1:5000/team" becomes "127-0-0-1-5000-team".
func NameFor(p secret.Pattern) string {
	// Every run of characters a label cannot hold becomes one "-".
	var b strings.Builder
	dash := false
	for _, r := range strings.ToLower(string(p)) {
		if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' {
			b.WriteRune(r)
			dash = false
		} else if !dash {
			b.WriteByte('-')
			dash = true
		}
	}
	n := strings.Trim(b.String(), "-")
	if len(n) > 63 {
		n = strings.Trim(n[:63], "-")
	}
	if n == "" {
		n = "registry"
	}
	return n
}
