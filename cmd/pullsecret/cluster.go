package main

import (
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/pullsecret/pullsecret/internal/fsutil"
	"github.com/pullsecret/pullsecret/proxy"
	"github.com/pullsecret/pullsecret/secret"
)

func clusterCommand() *command {
	return &command{
		summary: "Prepare the files the replicas of a cluster share",
		sub: map[string]*command{
			"init": {summary: "Make the sealing key, cluster secret and token signing keys", usage: clusterInitUsage, run: (*cli).clusterInit},
		},
	}
}

const clusterInitUsage = `Usage: pullsecret cluster init DIR

Make, once, the three files every replica of a cluster must share, in DIR
(created with mode 0700 when missing; each file 0600):

  key                      the key that seals pull secrets in the database
                           (PULLSECRET_KEY_FILE of every replica and of the
                           admin CLI)
  cluster-secret           the replicas' shared secret (cluster.secret_file):
                           the peer endpoint's key, the key of upload ids
  token-signing-keys.json  the registry-token signing keys
                           (cluster.signing_key_file)

It never replaces a file: a new sealing key would make every stored secret
unreadable, so an existing file is an error. Then, in Kubernetes:

  kubectl create secret generic pullsecret --from-file=DIR --from-file=dsn=FILE
`

// clusterSecretBytes of randomness, base64url: 64 characters.
const clusterSecretBytes = 48

func (c *cli) clusterInit(args []string) error {
	pos, err := c.parseFlags(newFlagSet("init"), args, clusterInitUsage)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		if len(pos) == 0 {
			return &usageError{msg: "missing DIR", usage: clusterInitUsage}
		}
		return &usageError{msg: fmt.Sprintf("unexpected argument %q", printable(pos[1])), usage: clusterInitUsage}
	}
	dir := pos[0]
	files, err := newClusterFiles()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("cluster init: %w", err)
	}
	for _, f := range files {
		if _, err := os.Lstat(filepath.Join(dir, f.name)); !errors.Is(err, fs.ErrNotExist) {
			if err == nil {
				return fmt.Errorf("cluster init: %s exists; it is never replaced (a new sealing key would orphan every stored secret)", filepath.Join(dir, f.name))
			}
			return fmt.Errorf("cluster init: %w", err)
		}
	}
	var made []string
	for _, f := range files {
		p := filepath.Join(dir, f.name)
		if err := fsutil.CreateFileAtomic(p, f.data); err != nil {
			for _, m := range made {
				os.Remove(m)
			}
			return fmt.Errorf("cluster init: %w", err)
		}
		made = append(made, p)
	}
	for _, f := range files {
		fmt.Fprintf(c.stdout, "%-24s %s\n", f.name, f.what)
	}
	return nil
}

type clusterFile struct {
	name, what string
	data       []byte
}

// newClusterFiles makes the content of the files before any is written, so
// a failure leaves DIR as it was.
func newClusterFiles() ([]clusterFile, error) {
	k, err := secret.NewKeyring()
	if err != nil {
		return nil, fmt.Errorf("cluster init: %w", err)
	}
	key, err := k.Marshal()
	if err != nil {
		return nil, fmt.Errorf("cluster init: %w", err)
	}
	raw := make([]byte, clusterSecretBytes)
	if _, err := rand.Read(raw); err != nil {
		return nil, fmt.Errorf("cluster init: %w", err)
	}
	signing, err := proxy.NewSigningKeySet()
	if err != nil {
		return nil, fmt.Errorf("cluster init: %w", err)
	}
	return []clusterFile{
		{"key", "sealing key (PULLSECRET_KEY_FILE)", key},
		{"cluster-secret", "cluster secret (cluster.secret_file)", []byte(base64.RawURLEncoding.EncodeToString(raw) + "\n")},
		{proxy.SigningKeysFile, "token signing keys (cluster.signing_key_file)", signing},
	}, nil
}
