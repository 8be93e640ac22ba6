// Package registry runs an in-process OCI registry for tests and the demo.
//
// It is distribution/v3 (the same code as the reference registry) served by
// an httptest server, with what tests need around it: htpasswd or token
// authentication, TLS with a generated CA, a request log, fault injection and
// helpers that seed images. Several registries may run in one process; no
// option changes global state except that distribution's logrus output is
// silenced once (see quiet.go for why that one cannot be avoided).
//
// It does not depend on package testing, so the demo can use it too.
package registry

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/distribution/distribution/v3/configuration"
	"github.com/distribution/distribution/v3/registry/handlers"

	// Storage drivers and access controllers register themselves by name;
	// the configuration refers to them by that name.
	_ "github.com/distribution/distribution/v3/registry/auth/htpasswd"
	_ "github.com/distribution/distribution/v3/registry/auth/token"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/filesystem"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/inmemory"
)

// Registry is a running in-process registry. Create one with Start and stop
// it with Close.
type Registry struct {
	srv    *httptest.Server
	app    *handlers.App
	dir    string // temporary directory owned by this registry (htpasswd, keys, CA)
	addr   string // 127.0.0.1:PORT
	scheme string // http or https
	log    *slog.Logger
	fsRoot string // "" for the inmemory driver

	tls    *tlsMaterial // nil without WithTLS
	users  *userStore   // nil without authentication
	issuer *tokenIssuer // nil unless WithTokenAuth
	faults *Faults
	rec    *recorder

	// seed reaches the registry without the network, the request log, hooks
	// or faults, so seeding never shows up in what tests assert on.
	seed http.RoundTripper

	closeOnce sync.Once
	closeErr  error
}

// Start starts a registry listening on a free loopback port (or the address
// given with WithAddr). ctx is the parent of distribution's application
// context; cancel it or call Close to stop background work.
func Start(ctx context.Context, opts ...Option) (_ *Registry, err error) {
	o := defaultOptions()
	for _, opt := range opts {
		opt(o)
	}
	if o.htpasswd != nil && o.token != nil {
		return nil, errors.New("registry: WithHTPasswd and WithTokenAuth are exclusive")
	}
	quietDistributionLogs()

	r := &Registry{log: o.logger, fsRoot: o.fsRoot, faults: o.faults, rec: newRecorder()}
	if r.faults == nil {
		r.faults = NewFaults()
	}
	r.dir, err = os.MkdirTemp("", "pullsecret-registry-")
	if err != nil {
		return nil, fmt.Errorf("registry: temp dir: %w", err)
	}
	defer func() {
		if err != nil {
			_ = r.Close()
		}
	}()

	ln, err := net.Listen("tcp", o.addr)
	if err != nil {
		return nil, fmt.Errorf("registry: listen on %s: %w", o.addr, err)
	}
	r.addr = ln.Addr().String()
	r.scheme = "http"
	if o.tls {
		r.scheme = "https"
		if r.tls, err = newTLSMaterial(r.dir); err != nil {
			_ = ln.Close()
			return nil, err
		}
	}

	cfg, err := r.configure(o)
	if err != nil {
		_ = ln.Close()
		return nil, err
	}
	if r.app, err = newApp(ctx, cfg); err != nil {
		_ = ln.Close()
		return nil, err
	}

	inner := http.Handler(r.app)
	if r.issuer != nil {
		// Not a ServeMux: it would redirect unclean paths before
		// distribution sees them.
		inner = http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
			if req.URL.Path == tokenPath {
				r.issuer.ServeHTTP(w, req)
				return
			}
			r.app.ServeHTTP(w, req)
		})
	}
	h := inner
	for _, wrap := range o.wrappers {
		h = wrap(h)
	}
	h = r.faults.Wrap(h)
	h = r.rec.wrap(h, o.hooks, r.log)

	r.srv = &httptest.Server{
		Listener: ln,
		Config: &http.Server{
			Handler: h,
			// TLS handshake failures from clients that do not trust the CA
			// are expected in tests; keep them out of stderr.
			ErrorLog: slog.NewLogLogger(r.log.Handler(), slog.LevelDebug),
		},
	}
	if r.tls != nil {
		r.srv.TLS = r.tls.serverConfig()
		r.srv.StartTLS()
	} else {
		r.srv.Start()
	}
	r.seed = &inprocTransport{h: inner, scheme: r.scheme, host: r.addr}
	return r, nil
}

// configure builds distribution's configuration and the authentication
// material it refers to.
func (r *Registry) configure(o *options) (*configuration.Configuration, error) {
	cfg := &configuration.Configuration{}
	cfg.Storage = configuration.Storage{
		// The upload purger is a goroutine per app that wakes daily; tests
		// never need it.
		"maintenance": configuration.Parameters{"uploadpurging": map[any]any{"enabled": false}},
		"delete":      configuration.Parameters{"enabled": true},
		"cache":       configuration.Parameters{"blobdescriptor": "inmemory"},
	}
	if o.fsRoot != "" {
		// distribution creates the root lazily and would only fail on
		// the first push, as a 500 that clients retry; fail now instead.
		if err := os.MkdirAll(o.fsRoot, 0o755); err != nil {
			return nil, fmt.Errorf("registry: filesystem root: %w", err)
		}
		cfg.Storage["filesystem"] = configuration.Parameters{"rootdirectory": o.fsRoot}
	} else {
		cfg.Storage["inmemory"] = configuration.Parameters{}
	}
	// An explicit secret avoids distribution's "generated random secret"
	// warning; it signs upload state only.
	cfg.HTTP.Secret = randomHex(16)

	switch {
	case o.htpasswd != nil:
		us, err := newUserStore(o.htpasswd, filepath.Join(r.dir, "htpasswd"))
		if err != nil {
			return nil, err
		}
		r.users = us
		cfg.Auth = configuration.Auth{"htpasswd": configuration.Parameters{
			"realm": basicRealm,
			"path":  us.htpasswdPath,
		}}
	case o.token != nil:
		us, err := newUserStore(o.token, "")
		if err != nil {
			return nil, err
		}
		r.users = us
		iss, err := newTokenIssuer(r.dir, r.URL()+tokenPath, r.addr, us, o.tokenTTL)
		if err != nil {
			return nil, err
		}
		r.issuer = iss
		cfg.Auth = configuration.Auth{"token": iss.distributionParameters()}
	}
	return cfg, nil
}

// newApp turns distribution's configuration panics into errors.
func newApp(ctx context.Context, cfg *configuration.Configuration) (app *handlers.App, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("registry: distribution rejected the configuration: %v", p)
		}
	}()
	return handlers.NewApp(ctx, cfg), nil
}

// Close stops the server, aborting requests still in flight, and removes the
// registry's temporary files. A filesystem root given with WithFilesystem is
// left alone. Close is idempotent.
func (r *Registry) Close() error {
	r.closeOnce.Do(func() {
		if r.srv != nil {
			// Abort in-flight requests (a client stuck on a Latency fault,
			// say) instead of waiting for them.
			r.srv.CloseClientConnections()
			r.srv.Close()
		}
		var errs []error
		if r.app != nil {
			if err := r.app.Shutdown(); err != nil {
				errs = append(errs, fmt.Errorf("registry: shutdown: %w", err))
			}
		}
		if r.dir != "" {
			if err := os.RemoveAll(r.dir); err != nil {
				errs = append(errs, fmt.Errorf("registry: remove temp dir: %w", err))
			}
		}
		r.closeErr = errors.Join(errs...)
	})
	return r.closeErr
}

// Addr is the registry's host:port, e.g. "127.0.0.1:41234", as used in image
// references.
func (r *Registry) Addr() string { return r.addr }

// Host is the same as Addr; it reads better where a registry host is meant.
func (r *Registry) Host() string { return r.addr }

// URL is the registry's base URL, "http://127.0.0.1:PORT" or https with WithTLS.
func (r *Registry) URL() string { return r.scheme + "://" + r.addr }

// Ref returns the reference of repo at tag, e.g. "127.0.0.1:PORT/repo:tag".
// A tag that is a digest ("sha256:...") gives "127.0.0.1:PORT/repo@sha256:...".
func (r *Registry) Ref(repo, tag string) string {
	if strings.Contains(tag, ":") {
		return r.addr + "/" + repo + "@" + tag
	}
	return r.addr + "/" + repo + ":" + tag
}

// Faults returns the registry's fault injector. It starts empty; rules added
// to it apply to every later request.
func (r *Registry) Faults() *Faults { return r.faults }

// Transport returns a new HTTP transport that trusts the registry's CA (with
// WithTLS) and nothing else special. It carries no credentials.
func (r *Registry) Transport() *http.Transport {
	t := http.DefaultTransport.(*http.Transport).Clone()
	if r.tls != nil {
		t.TLSClientConfig = r.tls.clientConfig()
	}
	return t
}

// Client returns an HTTP client using Transport.
func (r *Registry) Client() *http.Client { return &http.Client{Transport: r.Transport()} }

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // crypto/rand.Read never fails (Go >= 1.24)
	return hex.EncodeToString(b)
}
