package proxy

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/pullsecret/pullsecret/internal/netguard"
	"github.com/pullsecret/pullsecret/secret"
	"gopkg.in/yaml.v3"
)

// Defaults of the server configuration. docs/CONFIG.md documents every key.
const (
	// DefaultListen is where `pullsecret serve` listens with no flags and no
	// config: loopback only, port 5080 (5000 is taken by too many local
	// registries and macOS AirPlay).
	DefaultListen          = "127.0.0.1:5080"
	DefaultMaxManifestSize = 4 << 20
	DefaultTokenTTL        = 5 * time.Minute
	DefaultShutdownTimeout = 30 * time.Second

	DefaultUpstreamDialTimeout      = 10 * time.Second
	DefaultUpstreamTLSTimeout       = 10 * time.Second
	DefaultUpstreamHeaderTimeout    = 30 * time.Second
	DefaultUpstreamRequestTimeout   = 60 * time.Second
	DefaultUpstreamIdleConnTimeout  = 90 * time.Second
	DefaultUpstreamMaxIdleConnsHost = 32

	maxConfigSize = 1 << 20
)

// Config is the server's configuration: the YAML file of `pullsecret serve
// --config`, with the command-line flags applied over it. Unknown keys are
// errors. docs/CONFIG.md describes every key.
type Config struct {
	// Home is the data folder (sealed store, keys, token hashes). Empty:
	// $PULLSECRET_HOME and its fallbacks.
	Home string `yaml:"home"`
	// Listen is the address of the registry API, token server and
	// operational endpoints, all on one host:port.
	Listen string `yaml:"listen"`
	// TLSCert and TLSKey are PEM files; both or neither.
	TLSCert string `yaml:"tls_cert"`
	TLSKey  string `yaml:"tls_key"`
	// ExternalURL is how clients reach the server (https://proxy.example:5080);
	// it names the token realm in challenges. Empty: taken from each
	// request's Host.
	ExternalURL string `yaml:"external_url"`
	// AllowPrivateUpstreams lets upstreams resolve to loopback, private or
	// link-local addresses: true, false, or a list of CIDR prefixes,
	// addresses and host names.
	AllowPrivateUpstreams PrivatePolicy `yaml:"allow_private_upstreams"`
	// InsecureUpstreams are upstream hosts that may be reached over plain
	// HTTP (when HTTPS fails). Loopback hosts always may.
	InsecureUpstreams []string `yaml:"insecure_upstreams"`
	// Aliases map a name usable as the first path component (or as ns=) to
	// an upstream host, for every project.
	Aliases map[string]string `yaml:"aliases"`
	// Projects holds per-project settings.
	Projects map[string]ProjectConfig `yaml:"projects"`
	// TokenTTL is the lifetime of the registry tokens (JWTs) the token
	// server issues.
	TokenTTL time.Duration `yaml:"token_ttl"`
	// MaxManifestSize bounds manifests, fetched or pushed (bytes, or "4MiB").
	MaxManifestSize ByteSize `yaml:"max_manifest_size"`
	// VerifyBlobs hashes whole blobs as they stream through and aborts a
	// response whose bytes do not match (default true).
	VerifyBlobs bool `yaml:"verify_blobs"`
	// Upstream tunes the connections to upstream registries.
	Upstream UpstreamConfig `yaml:"upstream"`
	// Log configures the request and server logs.
	Log LogConfig `yaml:"log"`
	// ShutdownTimeout bounds the graceful shutdown on SIGINT/SIGTERM.
	ShutdownTimeout time.Duration `yaml:"shutdown_timeout"`
	// ShutdownDelay is how long the server keeps serving after SIGTERM,
	// /readyz already 503, before it stops accepting connections: a load
	// balancer (Kubernetes endpoints) learns of the shutdown only after
	// the signal, and connections it sends meanwhile must not be refused.
	ShutdownDelay time.Duration `yaml:"shutdown_delay"`
	// Kubelet turns on the kubelet credential-provider API when it names at
	// least one issuer.
	Kubelet *KubeletConfig `yaml:"kubelet"`
	// Cache is the content cache in front of the upstreams (issue 4).
	Cache CacheConfig `yaml:"cache"`
	// Audit is the audit trail of credentials handed out and of proxied
	// pulls and pushes.
	Audit AuditConfig `yaml:"audit"`
	// Metadata is where tokens, secrets, access records, fill leases and
	// the audit trail are kept: files in the data folder, or a PostgreSQL
	// database that replicas share (see metadata.go).
	Metadata MetadataConfig `yaml:"metadata"`
	// Cluster makes this server one of several replicas (clusterconfig.go).
	Cluster *ClusterConfig `yaml:"cluster"`
}

// AuditConfig configures the audit trail (package audit).
type AuditConfig struct {
	// Enabled records the trail (default true).
	Enabled bool `yaml:"enabled"`
	// Path is the JSON-lines file of the embedded mode (default
	// <home>/audit.jsonl).
	Path string `yaml:"path"`
	// Replica names this server in every record, to tell replicas that
	// share one trail apart (default: none).
	Replica string `yaml:"replica"`
}

// CacheConfig configures the proxy's content cache.
type CacheConfig struct {
	// Enabled turns the cache on (default true).
	Enabled bool `yaml:"enabled"`
	// Driver is the storage driver: "filesystem" (default), "s3-aws" or
	// "inmemory" (cachedriver.go).
	Driver string `yaml:"driver"`
	// Parameters are the driver's parameters by distribution's names
	// (s3-aws: bucket, region, regionendpoint, accesskey, secretkey, ...);
	// ${NAME} takes an environment variable, secretkey_file a file.
	Parameters map[string]any `yaml:"parameters"`
	// Root is the filesystem driver's folder (default <home>/cache).
	Root string `yaml:"root"`
	// SpoolDir is the local folder of in-flight fills with a driver other
	// than filesystem (default <home>/cache-spool).
	SpoolDir string `yaml:"spool_dir"`
	// TagTTL is how long a cached tag is served before a HEAD upstream
	// revalidates it (default 1m).
	TagTTL time.Duration `yaml:"tag_ttl"`
	// AccessTTL is how long a project's proven access to a repository lets
	// it read cached content without asking the upstream (default 10m).
	AccessTTL time.Duration `yaml:"access_ttl"`
	// GC is the background retention policy.
	GC CacheGCConfig `yaml:"gc"`
}

// CacheGCConfig is the background retention policy of the cache. Zero
// fields do not limit; no limit at all, or no interval, runs no GC.
type CacheGCConfig struct {
	MaxSize   ByteSize      `yaml:"max_size"`
	OlderThan time.Duration `yaml:"older_than"`
	Interval  time.Duration `yaml:"interval"`
}

// ProjectConfig is one project's settings.
type ProjectConfig struct {
	// Aliases are this project's own aliases; they win over the global
	// ones of the same name.
	Aliases map[string]string `yaml:"aliases"`
}

// UpstreamConfig tunes upstream connections.
type UpstreamConfig struct {
	DialTimeout           time.Duration `yaml:"dial_timeout"`
	TLSHandshakeTimeout   time.Duration `yaml:"tls_handshake_timeout"`
	ResponseHeaderTimeout time.Duration `yaml:"response_header_timeout"`
	// RequestTimeout bounds a whole request for a manifest, a tag list or
	// referrers, and the token exchange; blob bodies stream without one.
	RequestTimeout      time.Duration `yaml:"request_timeout"`
	IdleConnTimeout     time.Duration `yaml:"idle_conn_timeout"`
	MaxIdleConnsPerHost int           `yaml:"max_idle_conns_per_host"`
	// CAFiles are extra PEM CA bundles trusted for upstream TLS, on top of
	// the system roots.
	CAFiles []string `yaml:"ca_files"`
}

// LogConfig configures logging.
type LogConfig struct {
	Level  string `yaml:"level"`  // debug, info, warn, error
	Format string `yaml:"format"` // text or json
}

// DefaultConfig returns the configuration used when no file is given.
func DefaultConfig() Config {
	return Config{
		Listen:          DefaultListen,
		TokenTTL:        DefaultTokenTTL,
		MaxManifestSize: DefaultMaxManifestSize,
		VerifyBlobs:     true,
		ShutdownTimeout: DefaultShutdownTimeout,
		Upstream: UpstreamConfig{
			DialTimeout:           DefaultUpstreamDialTimeout,
			TLSHandshakeTimeout:   DefaultUpstreamTLSTimeout,
			ResponseHeaderTimeout: DefaultUpstreamHeaderTimeout,
			RequestTimeout:        DefaultUpstreamRequestTimeout,
			IdleConnTimeout:       DefaultUpstreamIdleConnTimeout,
			MaxIdleConnsPerHost:   DefaultUpstreamMaxIdleConnsHost,
		},
		Log: LogConfig{Level: "info", Format: "text"},
		Cache: CacheConfig{
			Enabled:   true,
			Driver:    "filesystem",
			TagTTL:    DefaultCacheTagTTL,
			AccessTTL: DefaultCacheAccessTTL,
		},
		Audit: AuditConfig{Enabled: true},
	}
}

// LoadConfig reads a YAML config file over the defaults. Unknown keys,
// wrong types and invalid values are errors naming the key.
func LoadConfig(path string) (Config, error) {
	f, err := os.Open(path)
	if err != nil {
		return Config{}, fmt.Errorf("config: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxConfigSize+1))
	if err != nil {
		return Config{}, fmt.Errorf("config %s: %w", path, err)
	}
	if len(b) > maxConfigSize {
		return Config{}, fmt.Errorf("config %s: larger than %d KiB", path, maxConfigSize>>10)
	}
	cfg, err := ParseConfig(b)
	if err != nil {
		return Config{}, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}

// ReplicaName is the name audit events carry: audit.replica, else the
// cluster's replica id (set after parsing by `serve --replica-id`).
func (c Config) ReplicaName() string {
	if c.Audit.Replica == "" && c.Cluster != nil {
		return c.Cluster.ReplicaID
	}
	return c.Audit.Replica
}

// ParseConfig parses YAML over the defaults and validates the result.
func ParseConfig(b []byte) (Config, error) {
	cfg := DefaultConfig()
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil && !errors.Is(err, io.EOF) {
		return Config{}, cleanYAMLError(err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return Config{}, errors.New("more than one YAML document")
	}
	if err := cfg.Validate(); err != nil {
		return Config{}, err
	}
	return cfg, nil
}

// cleanYAMLError drops yaml.v3's "yaml: unmarshal errors:\n  " framing.
func cleanYAMLError(err error) error {
	var te *yaml.TypeError
	if errors.As(err, &te) {
		return errors.New(strings.Join(te.Errors, "; "))
	}
	return err
}

var aliasRE = regexp.MustCompile(`^[a-z0-9]+(?:[_-][a-z0-9]+)*$`)

// Validate checks the configuration and canonicalises host names in
// place (aliases, insecure upstreams).
func (c *Config) Validate() error {
	var errs []error
	bad := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }

	if c.Listen == "" {
		c.Listen = DefaultListen
	}
	if _, port, err := net.SplitHostPort(c.Listen); err != nil {
		bad("listen: %q is not HOST:PORT", c.Listen)
	} else if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		bad("listen: %q has an invalid port", c.Listen)
	}
	if (c.TLSCert == "") != (c.TLSKey == "") {
		bad("tls_cert and tls_key: give both or neither")
	}
	if c.ExternalURL != "" {
		u, err := url.Parse(c.ExternalURL)
		switch {
		case err != nil || u.Host == "":
			bad("external_url: %q is not an absolute URL", c.ExternalURL)
		case u.Scheme != "http" && u.Scheme != "https":
			bad("external_url: scheme must be http or https")
		case u.User != nil || u.RawQuery != "" || u.Fragment != "":
			bad("external_url: no user info, query or fragment")
		case strings.Trim(u.Path, "/") != "":
			bad("external_url: a path is not supported; the registry API lives at /v2/")
		default:
			c.ExternalURL = u.Scheme + "://" + u.Host
		}
	}
	for i, h := range c.InsecureUpstreams {
		t, err := secret.ParseServerURL(h)
		if err != nil || t.Repo != "" {
			bad("insecure_upstreams[%d]: %q is not a registry host[:port]", i, h)
			continue
		}
		c.InsecureUpstreams[i] = t.Host
	}
	if err := canonicalAliases("aliases", c.Aliases); err != nil {
		errs = append(errs, err)
	}
	for p, pc := range c.Projects {
		if err := secret.ValidName(p); err != nil {
			bad("projects: %v", err)
		}
		if err := canonicalAliases("projects."+p+".aliases", pc.Aliases); err != nil {
			errs = append(errs, err)
		}
	}
	if c.TokenTTL <= 0 {
		c.TokenTTL = DefaultTokenTTL
	} else if c.TokenTTL < 10*time.Second || c.TokenTTL > 24*time.Hour {
		bad("token_ttl: %s is outside 10s..24h", c.TokenTTL)
	}
	if c.MaxManifestSize <= 0 {
		c.MaxManifestSize = DefaultMaxManifestSize
	} else if c.MaxManifestSize > 64<<20 {
		bad("max_manifest_size: at most 64MiB")
	}
	if c.ShutdownTimeout <= 0 {
		c.ShutdownTimeout = DefaultShutdownTimeout
	}
	if c.ShutdownDelay < 0 || c.ShutdownDelay > 10*time.Minute {
		bad("shutdown_delay: %s is outside 0..10m", c.ShutdownDelay)
	}
	u := &c.Upstream
	def := DefaultConfig().Upstream
	for _, d := range []struct {
		key string
		v   *time.Duration
		def time.Duration
	}{
		{"dial_timeout", &u.DialTimeout, def.DialTimeout},
		{"tls_handshake_timeout", &u.TLSHandshakeTimeout, def.TLSHandshakeTimeout},
		{"response_header_timeout", &u.ResponseHeaderTimeout, def.ResponseHeaderTimeout},
		{"request_timeout", &u.RequestTimeout, def.RequestTimeout},
		{"idle_conn_timeout", &u.IdleConnTimeout, def.IdleConnTimeout},
	} {
		if *d.v < 0 {
			bad("upstream.%s: negative", d.key)
		} else if *d.v == 0 {
			*d.v = d.def
		}
	}
	if u.MaxIdleConnsPerHost <= 0 {
		u.MaxIdleConnsPerHost = def.MaxIdleConnsPerHost
	}
	switch strings.ToLower(c.Log.Level) {
	case "":
		c.Log.Level = "info"
	case "debug", "info", "warn", "warning", "error":
		c.Log.Level = strings.ToLower(c.Log.Level)
	default:
		bad("log.level: %q (want debug, info, warn or error)", c.Log.Level)
	}
	switch strings.ToLower(c.Log.Format) {
	case "":
		c.Log.Format = "text"
	case "text", "json":
		c.Log.Format = strings.ToLower(c.Log.Format)
	default:
		bad("log.format: %q (want text or json)", c.Log.Format)
	}
	cc := &c.Cache
	if err := cc.validateDriver(); err != nil {
		errs = append(errs, err)
	}
	if cc.TagTTL < 0 {
		bad("cache.tag_ttl: negative")
	} else if cc.TagTTL == 0 {
		cc.TagTTL = DefaultCacheTagTTL
	}
	if cc.AccessTTL < 0 {
		bad("cache.access_ttl: negative")
	} else if cc.AccessTTL == 0 {
		cc.AccessTTL = DefaultCacheAccessTTL
	}
	if cc.GC.MaxSize < 0 || cc.GC.OlderThan < 0 || cc.GC.Interval < 0 {
		bad("cache.gc: negative value")
	}
	if len(c.Audit.Replica) > 64 || strings.ContainsFunc(c.Audit.Replica, func(r rune) bool { return r < 0x21 || r == 0x7f }) {
		bad("audit.replica: at most 64 printable characters, no spaces")
	}
	if c.Cluster != nil {
		if err := c.Cluster.validate(c.Metadata); err != nil {
			errs = append(errs, err)
		}
	}
	if err := c.Metadata.validate(c.Audit); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func canonicalAliases(key string, m map[string]string) error {
	var errs []error
	names := make([]string, 0, len(m))
	for a := range m {
		names = append(names, a)
	}
	sort.Strings(names)
	for _, a := range names {
		if !aliasRE.MatchString(a) || a == "localhost" {
			errs = append(errs, fmt.Errorf("%s: alias %q: use lowercase letters, digits, '-' and '_' (no dots, so it never looks like a host)", key, a))
			continue
		}
		t, err := secret.ParseServerURL(m[a])
		if err != nil || t.Repo != "" {
			errs = append(errs, fmt.Errorf("%s.%s: %q is not a registry host[:port]", key, a, m[a]))
			continue
		}
		m[a] = t.Host
	}
	return errors.Join(errs...)
}

// ByteSize is a size in bytes; YAML accepts an integer or a string with a
// unit: "4MiB", "512KiB", "1GiB", "4MB".
type ByteSize int64

// UnmarshalYAML implements yaml.Unmarshaler.
func (b *ByteSize) UnmarshalYAML(n *yaml.Node) error {
	var s string
	if err := n.Decode(&s); err != nil {
		return fmt.Errorf("line %d: want a size such as 4MiB", n.Line)
	}
	v, err := ParseByteSize(s)
	if err != nil {
		return fmt.Errorf("line %d: %v", n.Line, err)
	}
	*b = ByteSize(v)
	return nil
}

// ParseByteSize parses "4194304", "4MiB", "4M", "4MB", "512KiB".
func ParseByteSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	i := 0
	for i < len(t) && t[i] >= '0' && t[i] <= '9' {
		i++
	}
	if i == 0 {
		return 0, fmt.Errorf("size %q: want a number and an optional unit (KiB, MiB, GiB)", s)
	}
	n, err := strconv.ParseInt(t[:i], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("size %q: %v", s, err)
	}
	mult := int64(1)
	switch strings.ToLower(strings.TrimSpace(t[i:])) {
	case "", "b":
	case "k", "kb":
		mult = 1000
	case "kib", "ki":
		mult = 1 << 10
	case "m", "mb":
		mult = 1000 * 1000
	case "mib", "mi":
		mult = 1 << 20
	case "g", "gb":
		mult = 1000 * 1000 * 1000
	case "gib", "gi":
		mult = 1 << 30
	default:
		return 0, fmt.Errorf("size %q: unknown unit (want KiB, MiB or GiB)", s)
	}
	if n > (1<<62)/mult {
		return 0, fmt.Errorf("size %q: too large", s)
	}
	return n * mult, nil
}

// PrivatePolicy is allow_private_upstreams: a bool or a list of CIDR
// prefixes, addresses and host names.
type PrivatePolicy struct {
	netguard.Policy
	// Entries are the list as written, for logs and docs.
	Entries []string
}

// UnmarshalYAML implements yaml.Unmarshaler.
func (p *PrivatePolicy) UnmarshalYAML(n *yaml.Node) error {
	*p = PrivatePolicy{}
	switch n.Kind {
	case yaml.ScalarNode:
		var b bool
		if err := n.Decode(&b); err != nil {
			return fmt.Errorf("line %d: allow_private_upstreams: want true, false or a list of CIDR prefixes, addresses and host names", n.Line)
		}
		p.AllowPrivate = b
		return nil
	case yaml.SequenceNode:
		var list []string
		if err := n.Decode(&list); err != nil {
			return fmt.Errorf("line %d: allow_private_upstreams: want a list of strings", n.Line)
		}
		return p.Set(list)
	default:
		return fmt.Errorf("line %d: allow_private_upstreams: want true, false or a list", n.Line)
	}
}

// Set replaces the policy with list (CIDR prefixes, addresses, host names).
func (p *PrivatePolicy) Set(list []string) error {
	*p = PrivatePolicy{}
	for i, e := range list {
		if err := p.ParseEntry(e); err != nil {
			return fmt.Errorf("allow_private_upstreams[%d]: %v", i, err)
		}
		p.Entries = append(p.Entries, strings.TrimSpace(e))
	}
	return nil
}

// ParsePrivatePolicy parses the command-line form: "true", "false" or a
// comma-separated list.
func ParsePrivatePolicy(s string) (PrivatePolicy, error) {
	var p PrivatePolicy
	switch strings.TrimSpace(strings.ToLower(s)) {
	case "true":
		p.AllowPrivate = true
		return p, nil
	case "false", "":
		return p, nil
	}
	err := p.Set(strings.Split(s, ","))
	return p, err
}
