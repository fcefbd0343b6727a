module gatewayerrors

go 1.22
