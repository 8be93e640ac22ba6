package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"strings"

	storagedriver "github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/pullsecret/pullsecret/postgres"
	"github.com/pullsecret/pullsecret/proxy"
	"github.com/pullsecret/pullsecret/proxy/cache"
	"github.com/pullsecret/pullsecret/secret"
	"github.com/pullsecret/pullsecret/secret/awsecr"
)

func serveCommand() *command {
	return &command{
		summary: "Serve the pull-through proxy, token server and credential API",
		usage:   serveUsage,
		run:     (*cli).serve,
	}
}

const serveUsage = `Usage: pullsecret serve [--listen ADDR] [--config FILE] [--tls-cert F --tls-key F] [FLAGS]

Serve, on one host:port:
  /v2/                 the registry API: an authenticating pull-through proxy
                       to the upstreams of each project's pull secrets
                       (/v2/<upstream>/<repo>/... or containerd's ?ns=),
                       with push pass-through for tokens with the push scope
  /token               the registry token server (project token as password)
  /api/v1/credentials  the credential API of the helper's remote mode
  /healthz /readyz     liveness and readiness
  /metrics             Prometheus metrics

With no flags it listens on 127.0.0.1:5080 over plain HTTP, with the data
folder of $PULLSECRET_HOME. Flags override the config file; docs/CONFIG.md
describes every key. SIGINT or SIGTERM shuts down gracefully.

Every credential handed out and every pull and push through the proxy is
recorded in the audit trail (audit.path, default $PULLSECRET_HOME/audit.jsonl);
'pullsecret audit' shows it.

Flags:
  --listen ADDR                 listen address (default 127.0.0.1:5080)
  --config FILE                 YAML config file (unknown keys are errors)
  --tls-cert FILE, --tls-key FILE
                                serve HTTPS with this PEM certificate and key
  --external-url URL            how clients reach this server (token realm)
  --allow-private-upstreams V   true, false, or a comma-separated list of
                                CIDR prefixes, addresses and host names that
                                upstreams may resolve to (default: none)
  --log-level LEVEL             debug, info, warn or error (default info)
  --log-format FORMAT           text or json (default text)
  --home DIR                    data folder (default: $PULLSECRET_HOME)
  --replica-id ID               this replica's name in a cluster (cluster.replica_id;
                                default: the host name)
  --advertise URL               the base URL the other replicas reach this one at
                                (cluster.advertise), e.g. http://$(POD_IP):5080
`

func (c *cli) serve(args []string) error {
	fs := newFlagSet("serve")
	var (
		listen, cfgFile, tlsCert, tlsKey, external, allowPriv, logLevel, logFormat, home, replica, advertise string
	)
	fs.StringVar(&replica, "replica-id", "", "")
	fs.StringVar(&advertise, "advertise", "", "")
	fs.StringVar(&listen, "listen", "", "")
	fs.StringVar(&cfgFile, "config", "", "")
	fs.StringVar(&tlsCert, "tls-cert", "", "")
	fs.StringVar(&tlsKey, "tls-key", "", "")
	fs.StringVar(&external, "external-url", "", "")
	fs.StringVar(&allowPriv, "allow-private-upstreams", "", "")
	fs.StringVar(&logLevel, "log-level", "", "")
	fs.StringVar(&logFormat, "log-format", "", "")
	fs.StringVar(&home, "home", "", "")
	pos, err := c.parseFlags(fs, args, serveUsage)
	if err != nil {
		return err
	}
	if err := noArgs(pos, serveUsage); err != nil {
		return err
	}
	cfg := proxy.DefaultConfig()
	if cfgFile != "" {
		if cfg, err = proxy.LoadConfig(cfgFile); err != nil {
			return err
		}
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if set["listen"] {
		cfg.Listen = listen
	}
	if set["tls-cert"] {
		cfg.TLSCert = tlsCert
	}
	if set["tls-key"] {
		cfg.TLSKey = tlsKey
	}
	if set["external-url"] {
		cfg.ExternalURL = external
	}
	if set["allow-private-upstreams"] {
		p, err := proxy.ParsePrivatePolicy(allowPriv)
		if err != nil {
			return &usageError{msg: "--allow-private-upstreams: " + err.Error(), usage: serveUsage}
		}
		cfg.AllowPrivateUpstreams = p
	}
	if set["log-level"] {
		cfg.Log.Level = logLevel
	}
	if set["log-format"] {
		cfg.Log.Format = logFormat
	}
	if set["replica-id"] {
		if cfg.Cluster == nil {
			return &usageError{msg: "--replica-id: the configuration has no cluster section", usage: serveUsage}
		}
		cfg.Cluster.ReplicaID = replica
	}
	if set["advertise"] {
		if cfg.Cluster == nil {
			return &usageError{msg: "--advertise: the configuration has no cluster section", usage: serveUsage}
		}
		cfg.Cluster.Advertise = advertise
	}
	if set["home"] {
		cfg.Home = home
	} else if c.home != "" {
		cfg.Home = c.home
	}
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("configuration: %w", err)
	}
	if cfg.Cluster != nil {
		if err := cfg.Cluster.CheckAdvertise(); err != nil {
			return fmt.Errorf("configuration: %w", err)
		}
	}
	log := proxy.NewLogger(c.stderr, cfg.Log)
	ps, err := c.newProxyServer(cfg, log)
	if err != nil {
		return err
	}
	ln, err := ps.srv.Listen()
	if err != nil {
		return err
	}
	scheme := "http"
	if cfg.TLSCert != "" {
		scheme = "https"
	}
	log.Info("serving", "url", scheme+"://"+ln.Addr().String(), "home", ps.home,
		"metadata", describeMetadata(ps.metadata), "private_upstreams", cfg.AllowPrivateUpstreams.Describe())
	defer ps.close()
	return ps.srv.Serve(c.ctx, ln)
}

// proxyServer is a configured server and what it was built from.
type proxyServer struct {
	srv    *proxy.Server
	store  *secret.Store
	tokens *proxy.TokenStore
	auth   *proxy.Auth
	home   string
	// cache is nil when cache.enabled is false.
	cache   *cache.Cache
	records cache.AccessRecords
	stopGC  context.CancelFunc
	// audit is the audit trail, closed last so that it keeps every
	// request's record (nil when audit.enabled is false).
	audit io.Closer
	// metadata is the database replicas share (metadata.driver postgres;
	// nil with files), closed after everything that uses it.
	metadata     *postgres.DB
	stopMaintain context.CancelFunc
}

// close stops the background GC and closes the cache and access records.
func (ps *proxyServer) close() {
	if ps.stopGC != nil {
		ps.stopGC()
	}
	if ps.cache != nil {
		ps.cache.Close()
	}
	if cl, ok := ps.records.(io.Closer); ok {
		cl.Close()
	}
	if ps.audit != nil {
		ps.audit.Close()
	}
	if ps.metadata != nil {
		ps.stopMaintain()
		ps.metadata.Close()
	}
}

// newProxyServer opens the data folder and wires the store, the token
// store, the token server, the credential API, the kubelet API (when
// configured) and the proxy.
func (c *cli) newProxyServer(cfg proxy.Config, log *slog.Logger) (*proxyServer, error) {
	md, err := openMetadata(c.ctx, cfg.Metadata, log)
	if err != nil {
		return nil, err
	}
	built := false
	defer func() {
		if !built && md != nil {
			md.Close()
		}
	}()
	home, store, err := c.openServerStore(cfg, log, metadataStoreOptions(md)...)
	if err != nil {
		return nil, err
	}
	tokens, err := proxy.NewTokenStore(home, metadataTokenOptions(md)...)
	if err != nil {
		return nil, err
	}
	signer, err := loadSigner(cfg, home)
	if err != nil {
		return nil, err
	}
	// The server counts failed logins in its metrics; it is built after
	// the authenticator, hence the late binding (set before serving).
	var loginFailure func(string)
	aopts := []proxy.AuthOption{
		proxy.WithTokenTTL(cfg.TokenTTL),
		proxy.WithRepositoryFilter(proxy.AllowlistFilter(cfg, store)),
		proxy.WithAuthLogger(log),
		proxy.WithAuthFailureHook(func(reason string) {
			if loginFailure != nil {
				loginFailure(reason)
			}
		}),
	}
	if cfg.ExternalURL != "" {
		u, err := proxy.ParseExternalURL(cfg.ExternalURL)
		if err != nil {
			return nil, err
		}
		aopts = append(aopts, proxy.WithExternalURL(u))
	}
	auth := proxy.NewAuth(tokens, signer, aopts...)
	var hosts []string
	if h, _, err := net.SplitHostPort(cfg.Listen); err == nil && h != "" && h != "0.0.0.0" && h != "::" {
		hosts = append(hosts, cfg.Listen)
	}
	auditLog, auditCloser, err := c.openAuditLog(cfg, home, md, log)
	if err != nil {
		return nil, err
	}
	sopts := []proxy.Option{
		proxy.WithLogger(log),
		proxy.WithAudit(auditLog),
		proxy.WithHandler("/token", auth.TokenHandler()),
		proxy.WithHandler(proxy.CredentialAPIPath, proxy.NewCredentialAPI(auth, store,
			proxy.WithProxyHosts(hosts...), proxy.WithCredentialLogger(log), proxy.WithCredentialAudit(auditLog))),
	}
	if cfg.Kubelet != nil && len(cfg.Kubelet.Issuers) > 0 {
		k, err := proxy.NewKubeletAPI(*cfg.Kubelet, store, proxy.WithKubeletPullTokens(tokens),
			proxy.WithKubeletAudit(proxy.KubeletAuditTo(auditLog, log)))
		if err != nil {
			return nil, err
		}
		sopts = append(sopts, proxy.WithHandler(proxy.KubeletAPIPath, k))
	}
	ps := &proxyServer{store: store, tokens: tokens, auth: auth, home: home, audit: auditCloser, metadata: md}
	if md != nil {
		ps.stopMaintain = startMaintenance(c.ctx, md)
	}
	if md != nil {
		sopts = append(sopts, proxy.WithReadyCheck(proxy.ReadyCheck{Name: "metadata database", Check: md.Ping}))
	}
	var cacheOpts []cache.Option
	var clusterSecret []byte
	if cl := cfg.Cluster; cl != nil {
		if clusterSecret, err = cl.ReadSecret(); err != nil {
			return nil, err
		}
		cacheOpts = append(cacheOpts, cache.WithCluster(cache.Cluster{
			Leases: md.Leases(), Self: cl.ReplicaID, Addr: cl.Advertise, TTL: cl.LeaseTTL,
			Peer: proxy.PeerClient(clusterSecret, cfg.Upstream.DialTimeout),
		}))
		sopts = append(sopts, proxy.WithUploadKey(proxy.DeriveKey(clusterSecret, "upload ids")))
	}
	if cfg.Cache.Enabled {
		reg := prometheus.NewRegistry()
		if err := openProxyCache(c.ctx, ps, cfg, reg, log, cacheOpts...); err != nil {
			return nil, err
		}
		sopts = append(sopts, proxy.WithMetricsRegistry(reg), withCachedFetcher(cfg, ps.cache, ps.records, reg, log))
		if cfg.Cluster != nil {
			sopts = append(sopts, proxy.WithHandler(proxy.PeerPath, proxy.PeerHandler(ps.cache, clusterSecret, log)))
		}
		if cfg.Cache.Driver != "" && cfg.Cache.Driver != proxy.CacheDriverFilesystem {
			drv := ps.cache.Driver()
			sopts = append(sopts, proxy.WithReadyCheck(proxy.ReadyCheck{Name: "cache store", Check: func(ctx context.Context) error {
				_, err := drv.List(ctx, "/")
				var nf storagedriver.PathNotFoundError
				if errors.As(err, &nf) {
					return nil // an empty bucket
				}
				return err
			}}))
		}
	}
	srv, err := proxy.New(cfg, store, auth, sopts...)
	if err != nil {
		ps.close()
		return nil, err
	}
	loginFailure = srv.LoginFailure
	ps.srv = srv
	built = true
	return ps, nil
}

// openServerStore opens the sealed store of the data folder (cfg.Home, else
// $PULLSECRET_HOME and its fallbacks) the way the server resolves pull
// secrets: the key file of $PULLSECRET_KEY_FILE, ECR tokens cached on disk.
func (c *cli) openServerStore(cfg proxy.Config, log *slog.Logger, opts ...secret.Option) (string, *secret.Store, error) {
	home := cfg.Home
	if home == "" {
		var err error
		if home, err = secret.HomeFromEnv(c.getenv); err != nil {
			return "", nil, err
		}
	}
	store, err := secret.Open(home, append([]secret.Option{
		secret.WithKeyFile(c.getenv("PULLSECRET_KEY_FILE")),
		secret.WithDiskCachedECR(awsecr.NewFromEnv(c.getenv), secret.WithCacheLogger(log))}, opts...)...)
	if err != nil {
		return "", nil, err
	}
	return home, store, nil
}

// openContentCache opens the content cache as the server uses it: on
// cache.driver (openCacheStore: filesystem under cache.root, default
// <home>/cache, or s3-aws, inmemory), the tag TTL and manifest limit of cfg,
// metrics in reg. Each open takes its own flocked spool folder, so 'serve'
// and 'cache warm' may share one cache.
func openContentCache(ctx context.Context, cfg proxy.Config, home string, reg prometheus.Registerer, log *slog.Logger, extra ...cache.Option) (*cache.Cache, error) {
	m, err := cache.NewPrometheus(reg)
	if err != nil {
		return nil, err
	}
	return openCacheStore(ctx, cfg.Cache, home, log, append([]cache.Option{cache.WithTagTTL(cfg.Cache.TagTTL),
		cache.WithMaxManifestSize(int64(cfg.MaxManifestSize)), cache.WithMetrics(m), cache.WithLogger(log)}, extra...)...)
}

// loadSigner loads the registry-token signing keys: the cluster's shared
// file, which must exist, or the data folder's, made on first use.
func loadSigner(cfg proxy.Config, home string) (*proxy.Signer, error) {
	if cfg.Cluster != nil && cfg.Cluster.SigningKeyFile != "" {
		s, err := proxy.LoadSignerFile(cfg.Cluster.SigningKeyFile)
		if err != nil {
			return nil, fmt.Errorf("cluster.signing_key_file: %w", err)
		}
		return s, nil
	}
	return proxy.LoadSigner(home)
}

// withCachedFetcher puts the caching fetcher (tenant checks, coalesced
// verified fills, access records) in front of the server's upstream fetcher.
func withCachedFetcher(cfg proxy.Config, cc *cache.Cache, records cache.AccessRecords, reg prometheus.Registerer, log *slog.Logger) proxy.Option {
	return proxy.WithFetcher(func(next proxy.Fetcher) proxy.Fetcher {
		return proxy.NewCachedFetcher(next, cc, records, proxy.CachedOptions{
			TagTTL: cfg.Cache.TagTTL, AccessTTL: cfg.Cache.AccessTTL, Logger: log, Registerer: reg,
			MaxManifestSize: int64(cfg.MaxManifestSize),
		})
	})
}

// openProxyCache opens the content cache (openContentCache), the access
// records (<home>/access.json) and starts the background GC when a policy
// and an interval are set.
func openProxyCache(ctx context.Context, ps *proxyServer, cfg proxy.Config, reg *prometheus.Registry, log *slog.Logger, extra ...cache.Option) error {
	cc, err := openContentCache(ctx, cfg, ps.home, reg, log, extra...)
	if err != nil {
		return err
	}
	var records cache.AccessRecords
	if ps.metadata != nil {
		records = ps.metadata.AccessRecords()
	} else if records, err = cache.OpenAccessRecords(filepath.Join(ps.home, "access.json")); err != nil {
		cc.Close()
		return fmt.Errorf("access records: %w", err)
	}
	ps.cache, ps.records = cc, records
	gc := cfg.Cache.GC
	if gc.Interval > 0 && (gc.MaxSize > 0 || gc.OlderThan > 0) {
		gctx, cancel := context.WithCancel(ctx)
		ps.stopGC = cancel
		go cc.RunGC(gctx, gc.Interval, cache.Policy{MaxSize: int64(gc.MaxSize), OlderThan: gc.OlderThan})
	}
	return nil
}

// indent prefixes every line of s.
func indent(s, prefix string) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return prefix + strings.Join(lines, "\n"+prefix) + "\n"
}
