package main

// The metadata store (issue 7): files in the data folder, or a PostgreSQL
// database shared by the replicas of 'pullsecret serve'. The admin
// commands that manage tokens and secrets reach the same store as the
// server when given its config (--config, else $PULLSECRET_CONFIG), so that
// a token revoked or a secret rotated through any of them bites on every
// replica at its next request.

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"time"

	"github.com/pullsecret/pullsecret/postgres"
	"github.com/pullsecret/pullsecret/proxy"
	"github.com/pullsecret/pullsecret/secret"
)

// configFlagUsage documents --config for the token and secret commands.
const configFlagUsage = `  --config FILE         the server's config (default: $PULLSECRET_CONFIG): use
                        the metadata store and data folder it names, e.g. the
                        PostgreSQL database that server replicas share
`

// metadataOpenTimeout bounds connecting to the database and migrating its
// schema (which may wait for another replica's migration).
const metadataOpenTimeout = time.Minute

// metadataMaintenance is how often serve prunes expired rows.
const metadataMaintenance = 10 * time.Minute

// configFlag registers --config on a token or secret command.
func (c *cli) configFlag(fs *flag.FlagSet, co *common) {
	fs.StringVar(&co.config, "config", "", "")
}

// commandConfig reads the server config a command was given: --config,
// else $PULLSECRET_CONFIG. ok is false when there is none.
func (c *cli) commandConfig(co *common) (cfg proxy.Config, ok bool, err error) {
	file := ""
	if co != nil {
		file = co.config
	}
	if file == "" {
		file = c.getenv("PULLSECRET_CONFIG")
	}
	if file == "" {
		return proxy.Config{}, false, nil
	}
	cfg, err = proxy.LoadConfig(file)
	if err != nil {
		return proxy.Config{}, false, err
	}
	return cfg, true, nil
}

// openMetadata connects to the database of a config with metadata driver
// postgres and brings its schema up to date; nil for the file driver. The
// caller closes it.
func openMetadata(ctx context.Context, m proxy.MetadataConfig, log *slog.Logger) (*postgres.DB, error) {
	if m.Driver != proxy.MetadataPostgres {
		return nil, nil
	}
	dsn, err := m.ReadDSN()
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, metadataOpenTimeout)
	defer cancel()
	db, err := postgres.Open(ctx, dsn, postgres.WithLogger(log))
	if err != nil {
		return nil, fmt.Errorf("metadata: %w", err)
	}
	return db, nil
}

// commandMetadata is openMetadata for an admin command: the database is
// closed when the command ends.
func (c *cli) commandMetadata(cfg proxy.Config) (*postgres.DB, error) {
	db, err := openMetadata(c.ctx, cfg.Metadata, slog.New(slog.NewTextHandler(c.stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	if db != nil {
		c.cleanup = append(c.cleanup, db.Close)
	}
	return db, err
}

// configStoreOptions are what the config of a secret command changes in
// how the sealed store opens: its data folder (when the command names
// none) and, with metadata driver postgres, the database's records.
func (c *cli) configStoreOptions(co *common) (home string, opts []secret.Option, err error) {
	cfg, ok, err := c.commandConfig(co)
	if !ok || err != nil {
		return "", nil, err
	}
	db, err := c.commandMetadata(cfg)
	if err != nil {
		return "", nil, err
	}
	if db != nil {
		opts = append(opts, secret.WithBackend(db.Secrets()))
	}
	return cfg.Home, opts, nil
}

// metadataStoreOptions keep the server's sealed records in db (none with
// the file driver: nil db).
func metadataStoreOptions(db *postgres.DB) []secret.Option {
	if db == nil {
		return nil
	}
	return []secret.Option{secret.WithBackend(db.Secrets())}
}

// databaseTokenStore is the project token store in the metadata database
// of the command's config (--config, $PULLSECRET_CONFIG), or nil when the
// config names no database or there is no config; cfg is the config (zero
// without one).
func (c *cli) databaseTokenStore(co *common) (ts *proxy.TokenStore, cfg proxy.Config, err error) {
	cfg, ok, err := c.commandConfig(co)
	if err != nil || !ok {
		return nil, cfg, err
	}
	db, err := c.commandMetadata(cfg)
	if err != nil || db == nil {
		return nil, cfg, err
	}
	ts, err = proxy.NewTokenStore("", metadataTokenOptions(db)...)
	return ts, cfg, err
}

// metadataTokenOptions keep the server's project tokens in db.
func metadataTokenOptions(db *postgres.DB) []proxy.TokenStoreOption {
	if db == nil {
		return nil
	}
	return []proxy.TokenStoreOption{proxy.WithTokenBackend(db.Tokens())}
}

// startMaintenance prunes db's expired rows in the background until the
// returned function is called.
func startMaintenance(ctx context.Context, db *postgres.DB) context.CancelFunc {
	ctx, cancel := context.WithCancel(ctx)
	go db.Maintain(ctx, metadataMaintenance)
	return cancel
}

// describeMetadata names the metadata store in logs (never the password).
func describeMetadata(db *postgres.DB) string {
	if db == nil {
		return proxy.MetadataFile
	}
	return db.String()
}
