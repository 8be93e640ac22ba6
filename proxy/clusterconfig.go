package proxy

import (
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"time"
)

// ClusterConfig makes this server one replica of several that share a
// storage driver (cache.driver s3-aws, say) and a PostgreSQL database
// (metadata.driver postgres): fill leases in the database pick one replica
// to fetch each cold blob from the upstream, and the others stream it from
// that replica's peer endpoint (PeerPath) while it fills.
type ClusterConfig struct {
	// ReplicaID names this replica in the lease table and the audit trail
	// (`serve --replica-id`; default: the host name). Unique per replica.
	ReplicaID string `yaml:"replica_id"`
	// Advertise is the base URL the other replicas reach this one at,
	// e.g. http://10.0.0.5:5000 (a pod IP; `serve --advertise`). Only
	// serve needs it.
	Advertise string `yaml:"advertise"`
	// SecretFile holds the cluster secret every replica shares (a
	// Kubernetes Secret mount): the peer endpoint's key and the key of
	// upload ids are derived from it, so chunked pushes need no sticky
	// sessions.
	SecretFile string `yaml:"secret_file"`
	// SigningKeyFile is the registry-token signing key set every replica
	// shares (default: <home>/token-signing-keys.json, which is per data
	// folder): a token issued by one replica must verify on the others.
	SigningKeyFile string `yaml:"signing_key_file"`
	// LeaseTTL is how long a fill lease lasts unrenewed: the longest a
	// filler's death stalls the others (default 15s).
	LeaseTTL time.Duration `yaml:"lease_ttl"`
}

const minClusterSecret = 32

func (c *ClusterConfig) validate(md MetadataConfig) error {
	var errs []error
	if md.Driver != MetadataPostgres {
		errs = append(errs, errors.New("cluster: needs metadata.driver postgres (the replicas' shared lease table)"))
	}
	if c.ReplicaID == "" {
		h, err := os.Hostname()
		if err != nil || h == "" {
			errs = append(errs, errors.New("cluster.replica_id: not set and no host name"))
		}
		c.ReplicaID = h
	}
	if len(c.ReplicaID) > 64 || strings.ContainsFunc(c.ReplicaID, func(r rune) bool { return r < 0x21 || r == 0x7f }) {
		errs = append(errs, errors.New("cluster.replica_id: at most 64 printable characters without spaces"))
	}
	// Empty is left to `serve --advertise` (a pod learns its IP at start);
	// CheckAdvertise requires it before serving.
	if c.Advertise != "" {
		if err := c.CheckAdvertise(); err != nil {
			errs = append(errs, err)
		}
	}
	if c.SecretFile == "" {
		errs = append(errs, errors.New("cluster.secret_file: required"))
	}
	if c.LeaseTTL == 0 {
		c.LeaseTTL = 15 * time.Second
	}
	if c.LeaseTTL < time.Second {
		errs = append(errs, errors.New("cluster.lease_ttl: at least 1s"))
	}
	return errors.Join(errs...)
}

// CheckAdvertise requires Advertise to be an http(s) base URL.
func (c *ClusterConfig) CheckAdvertise() error {
	if c.Advertise == "" {
		return errors.New("cluster.advertise: required (or serve --advertise URL)")
	}
	if u, err := url.Parse(c.Advertise); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return fmt.Errorf("cluster.advertise: %q is not an http(s) base URL", c.Advertise)
	}
	return nil
}

// ReadSecret reads the cluster secret (surrounding white space dropped).
func (c *ClusterConfig) ReadSecret() ([]byte, error) {
	b, err := os.ReadFile(c.SecretFile)
	if err != nil {
		return nil, fmt.Errorf("cluster secret: %w", err)
	}
	b = []byte(strings.TrimSpace(string(b)))
	if len(b) < minClusterSecret {
		return nil, fmt.Errorf("cluster secret %s: at least %d bytes, got %d", c.SecretFile, minClusterSecret, len(b))
	}
	return b, nil
}

// LoadSignerFile reads a signing key set that already exists (replicas
// must not each make their own).
func LoadSignerFile(path string) (*Signer, error) { return readSigner(path) }
