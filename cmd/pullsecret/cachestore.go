package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	storagedriver "github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/distribution/distribution/v3/registry/storage/driver/factory"
	// The cache's storage drivers other than the filesystem (which the
	// cache opens itself). Imported here only: the credential helper
	// binary must not carry the AWS SDK.
	_ "github.com/distribution/distribution/v3/registry/storage/driver/inmemory"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/s3-aws"

	"github.com/pullsecret/pullsecret/proxy"
	"github.com/pullsecret/pullsecret/proxy/cache"
)

// storeProbeTimeout bounds the check that a store answers at startup.
const storeProbeTimeout = 20 * time.Second

// openCacheStore opens the content cache on cache.driver with
// cache.parameters: the filesystem driver under cache.root (default
// <home>/cache), or a distribution driver made by its factory, with the
// spool of in-flight fills in cache.spool_dir (default <home>/cache-spool).
// Parameters are resolved from the process environment (${NAME}) and secret
// files; no error or log line carries a secret value.
func openCacheStore(ctx context.Context, cc proxy.CacheConfig, home string, log *slog.Logger, opts ...cache.Option) (*cache.Cache, error) {
	d, err := cc.ResolveDriver(os.Getenv)
	if err != nil {
		return nil, err
	}
	if d.Name == proxy.CacheDriverFilesystem {
		root := cc.Root
		if r, ok := d.Parameters["rootdirectory"].(string); ok && r != "" {
			root = r
		}
		if root == "" {
			root = filepath.Join(home, "cache")
		}
		c, err := cache.OpenFilesystem(ctx, root, opts...)
		if err != nil {
			return nil, fmt.Errorf("cache %s: %w", root, err)
		}
		// The storage driver writes 0644 files: the folder keeps them private
		// (cached layers of private images are no one else's business).
		if err := os.Chmod(root, 0o700); err != nil {
			c.Close()
			return nil, fmt.Errorf("cache %s: %w", root, err)
		}
		return c, nil
	}

	drv, err := factory.Create(ctx, d.Factory, d.Parameters)
	if err != nil {
		// The driver's parameter errors quote values.
		return nil, fmt.Errorf("cache driver %s: %w", d.Name, d.RedactError(err))
	}
	// Fail at startup, not on every pull, when the store is unreachable or
	// refuses the credentials.
	if err := probeStore(ctx, drv); err != nil {
		return nil, fmt.Errorf("cache driver %s: %w", d.Describe(), d.RedactError(err))
	}
	spool := cc.SpoolDir
	if spool == "" {
		spool = filepath.Join(home, "cache-spool")
	}
	c, err := cache.Open(ctx, drv, append(opts, cache.WithSpoolDir(spool))...)
	if err != nil {
		return nil, fmt.Errorf("cache driver %s: %w", d.Describe(), d.RedactError(err))
	}
	log.Info("cache on a storage driver", "driver", d.Describe(), "spool", spool)
	return c, nil
}

// probeStore lists the store's top level: it needs the endpoint, the
// bucket and list permission, which the cache's scans need anyway.
func probeStore(ctx context.Context, drv storagedriver.StorageDriver) error {
	ctx, cancel := context.WithTimeout(ctx, storeProbeTimeout)
	defer cancel()
	_, err := drv.List(ctx, "/")
	if err != nil && !errors.As(err, new(storagedriver.PathNotFoundError)) {
		return fmt.Errorf("list the store: %w", err)
	}
	return nil
}
